"""Head prologue: latent vector z_k that W2 projects (vanilla W1[x], gated g * W1[x], RNN tanh(O)),
the RNN state update, and the confidence logit; Triton device functions plus PyTorch twins.

The twins use the very torch ops of dspark_plugin.model.heads so that on CPU they reproduce the core's
drafting bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark_plugin.kernels._triton import HAVE_TRITON, alloc, dot_ieee, next_pow2, tl, triton
from dspark_plugin.kernels.weights import HeadWeights


def latent_torch(w: HeadWeights, w1_prev: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None):
    """w1_prev [B, r], h [B, d] (already in w1's dtype) -> (z [B, r], new state)."""
    if w.head_type == "vanilla":
        return w1_prev, state
    if w.head_type == "gated":
        return torch.sigmoid(F.linear(torch.cat([h, w1_prev], -1), w.proj_w, w.proj_b)) * w1_prev, state
    g, c, o = F.linear(torch.cat([state, w1_prev, h], -1), w.proj_w, w.proj_b).chunk(3, dim=-1)
    g = torch.sigmoid(g)
    return torch.tanh(o), g * state + (1.0 - g) * torch.tanh(c)


def confidence_torch(w: HeadWeights, h: torch.Tensor, w1_prev: torch.Tensor) -> torch.Tensor | None:
    """Confidence logit [B] (float32), as ConfidenceHead.logit."""
    if w.conf_w is None:
        return None
    x = torch.cat([h, w1_prev.to(h.dtype)], -1) if w.conf_with_markov else h
    return F.linear(x.to(w.conf_w.dtype), w.conf_w, w.conf_b).squeeze(-1).float()


def init_state_torch(w: HeadWeights, batch: int) -> torch.Tensor | None:
    if w.head_type != "rnn":
        return None
    return w.w1.new_zeros(batch, w.rank)


if HAVE_TRITON:

    @triton.jit
    def seg_dot(acc, x, W_ptr, row0, col0, ld, n_out, n_in,
                R_PAD: tl.constexpr, K_PAD: tl.constexpr, DOT_IEEE: tl.constexpr):
        """acc [BB, R_PAD] += x [BB, K_PAD] @ W[row0:row0+n_out, col0:col0+n_in]^T."""
        rr = tl.arange(0, R_PAD)
        kk = tl.arange(0, K_PAD)
        w = tl.load(W_ptr + (row0 + rr)[:, None].to(tl.int64) * ld + col0 + kk[None, :],
                    mask=(rr[:, None] < n_out) & (kk[None, :] < n_in), other=0.0)
        xw = x.to(W_ptr.dtype.element_ty)
        if DOT_IEEE:
            acc += tl.dot(xw, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xw, tl.trans(w))
        return acc

    @triton.jit
    def load_h(H_ptr, stride_h, rows, rmask, k0, D, BLOCK_K: tl.constexpr):
        kk = k0 + tl.arange(0, BLOCK_K)
        return tl.load(H_ptr + rows.to(tl.int64)[:, None] * stride_h + kk[None, :],
                       mask=rmask[:, None] & (kk[None, :] < D), other=0.0).to(tl.float32)

    @triton.jit
    def tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def latent(rows, rmask, w1, s, H_ptr, stride_h, P_ptr, PB_ptr, R, D,
               BLOCK_B: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
               KIND: tl.constexpr, DOT_IEEE: tl.constexpr):
        """KIND 0 vanilla, 1 gated, 2 rnn. w1, s: [BLOCK_B, R_PAD] float32 -> (z, new s)."""
        rr = tl.arange(0, R_PAD)
        if KIND == 0:
            z = w1
        elif KIND == 1:
            acc = tl.zeros([BLOCK_B, R_PAD], tl.float32)
            for k0 in range(0, D, BLOCK_K):
                acc = seg_dot(acc, load_h(H_ptr, stride_h, rows, rmask, k0, D, BLOCK_K),
                              P_ptr, 0, k0, D + R, R, D - k0, R_PAD, BLOCK_K, DOT_IEEE)
            acc = seg_dot(acc, w1, P_ptr, 0, D, D + R, R, R, R_PAD, R_PAD, DOT_IEEE)
            acc += tl.load(PB_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
            z = tl.sigmoid(acc) * w1
        else:
            ld = 2 * R + D
            ag = tl.zeros([BLOCK_B, R_PAD], tl.float32)
            ac = tl.zeros([BLOCK_B, R_PAD], tl.float32)
            ao = tl.zeros([BLOCK_B, R_PAD], tl.float32)
            ag = seg_dot(ag, s, P_ptr, 0, 0, ld, R, R, R_PAD, R_PAD, DOT_IEEE)
            ac = seg_dot(ac, s, P_ptr, R, 0, ld, R, R, R_PAD, R_PAD, DOT_IEEE)
            ao = seg_dot(ao, s, P_ptr, 2 * R, 0, ld, R, R, R_PAD, R_PAD, DOT_IEEE)
            ag = seg_dot(ag, w1, P_ptr, 0, R, ld, R, R, R_PAD, R_PAD, DOT_IEEE)
            ac = seg_dot(ac, w1, P_ptr, R, R, ld, R, R, R_PAD, R_PAD, DOT_IEEE)
            ao = seg_dot(ao, w1, P_ptr, 2 * R, R, ld, R, R, R_PAD, R_PAD, DOT_IEEE)
            for k0 in range(0, D, BLOCK_K):
                hk = load_h(H_ptr, stride_h, rows, rmask, k0, D, BLOCK_K)
                ag = seg_dot(ag, hk, P_ptr, 0, 2 * R + k0, ld, R, D - k0, R_PAD, BLOCK_K, DOT_IEEE)
                ac = seg_dot(ac, hk, P_ptr, R, 2 * R + k0, ld, R, D - k0, R_PAD, BLOCK_K, DOT_IEEE)
                ao = seg_dot(ao, hk, P_ptr, 2 * R, 2 * R + k0, ld, R, D - k0, R_PAD, BLOCK_K, DOT_IEEE)
            rm = rr < R
            g = tl.sigmoid(ag + tl.load(PB_ptr + rr, mask=rm, other=0.0).to(tl.float32)[None, :])
            c = ac + tl.load(PB_ptr + R + rr, mask=rm, other=0.0).to(tl.float32)[None, :]
            o = ao + tl.load(PB_ptr + 2 * R + rr, mask=rm, other=0.0).to(tl.float32)[None, :]
            s = g * s + (1.0 - g) * tanh(c)
            z = tanh(o)
        return z, s

    @triton.jit
    def confidence(rows, rmask, w1, H_ptr, stride_h, CW_ptr, CB_ptr, R, D,
                   BLOCK_B: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                   CONF_MARKOV: tl.constexpr):
        acc = tl.zeros([BLOCK_B], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            cw = tl.load(CW_ptr + kk, mask=kk < D, other=0.0).to(tl.float32)
            acc += tl.sum(load_h(H_ptr, stride_h, rows, rmask, k0, D, BLOCK_K) * cw[None, :], 1)
        if CONF_MARKOV:
            rr = tl.arange(0, R_PAD)
            cw = tl.load(CW_ptr + D + rr, mask=rr < R, other=0.0).to(tl.float32)
            acc += tl.sum(w1 * cw[None, :], 1)
        return acc + tl.load(CB_ptr).to(tl.float32)

    @triton.jit
    def load_w1(W1_ptr, prev, rmask, R, R_PAD: tl.constexpr):
        rr = tl.arange(0, R_PAD)
        return tl.load(W1_ptr + prev.to(tl.int64)[:, None] * R + rr[None, :],
                       mask=rmask[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)

    @triton.jit
    def _latent_kernel(prev_ptr, W1_ptr, H_ptr, stride_h, S_ptr, P_ptr, PB_ptr, Z_ptr, SN_ptr, B, R, D,
                       BLOCK_B: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                       KIND: tl.constexpr, DOT_IEEE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rr = tl.arange(0, R_PAD)
        m2 = rmask[:, None] & (rr[None, :] < R)
        prev = tl.load(prev_ptr + rows, mask=rmask, other=0)
        w1 = load_w1(W1_ptr, prev, rmask, R, R_PAD)
        off = rows.to(tl.int64)[:, None] * R + rr[None, :]
        if KIND == 2:
            s = tl.load(S_ptr + off, mask=m2, other=0.0).to(tl.float32)
        else:
            s = tl.zeros([BLOCK_B, R_PAD], tl.float32)
        z, s = latent(rows, rmask, w1, s, H_ptr, stride_h, P_ptr, PB_ptr, R, D,
                      BLOCK_B, R_PAD, BLOCK_K, KIND, DOT_IEEE)
        tl.store(Z_ptr + off, z, mask=m2)
        if KIND == 2:
            tl.store(SN_ptr + off, s, mask=m2)

    KINDS = {"vanilla": 0, "gated": 1, "rnn": 2}

    def latent_triton(w: HeadWeights, prev: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None):
        """Gated / RNN prologue in one launch -> (z [B, r] float32, new state [B, r] | None)."""
        b, d = h.shape
        r = w.rank
        kind = KINDS[w.head_type]
        z = alloc(b, r, device=h.device, dtype=torch.float32)
        new_state = alloc(b, r, device=h.device, dtype=state.dtype) if kind == 2 else None
        r_pad = max(16, next_pow2(r))
        block_b = 16 if b <= 16 else 32
        h = h if h.stride(-1) == 1 else h.contiguous()
        s = state.contiguous() if kind == 2 else z
        _latent_kernel[(triton.cdiv(b, block_b),)](
            prev, w.w1, h, h.stride(0), s, w.proj_w,
            w.proj_b if w.proj_b is not None else w.proj_w.new_zeros(w.proj_w.shape[0]),
            z, new_state if new_state is not None else z, b, r, d,
            BLOCK_B=block_b, R_PAD=r_pad, BLOCK_K=min(64, max(16, next_pow2(d))), KIND=kind,
            DOT_IEEE=dot_ieee(w.proj_w.dtype))
        return z, new_state
