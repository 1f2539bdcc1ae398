"""Fused sequential-head step: logits = U_k + W2 . z_k, then sample, for a batch of requests.

One launch (vanilla head) computes, per request: the Markov bias over the whole vocabulary tile by
tile, the greedy argmax or Gumbel-max sample (per-request temperature and seed, optional top-k),
the token's draft log-probability and the confidence logit. The vocabulary is split across
programs (flash-decoding style) so that batch 1 still uses the whole GPU; each program leaves a
few statistics per row, and the last program of a row block to finish (atomic ticket) merges them.
Gated / RNN heads first run a tiny prologue launch (heads_fused.latent_triton) for z_k: doing that
[d+r -> r] GEMV inside every vocabulary split would re-read its weights once per split.
The full draft row (needed by rejection sampling) is written as scaled logits during the scan and
normalised by one extra elementwise launch, only when asked for.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dspark_plugin import envs
from dspark_plugin.kernels._triton import HAVE_TRITON, alloc, dot_ieee, interpreting, next_pow2, num_sms, tl, triton
from dspark_plugin.kernels.epilogue import sample_epilogue_torch
from dspark_plugin.kernels.heads_fused import confidence_torch, latent_torch
from dspark_plugin.kernels.weights import HeadWeights

# Larger k falls back to the twin: the running top-k keys live in registers.
MAX_TOP_K = 256
# Per row the combine merges NSPLIT * TOPK_PAD candidate keys in one program; keep that small.
MAX_TOPK_CANDIDATES = 2048


@dataclasses.dataclass
class StepResult:
    token: torch.Tensor                 # [B] int64
    logprob: torch.Tensor               # [B] float32, log p_draft(token) (0 for greedy rows)
    conf_logit: torch.Tensor | None     # [B] float32 (before calibration / sigmoid)
    probs: torch.Tensor | None          # [B, V] float32 draft distribution, if asked for
    state: torch.Tensor | None          # RNN state after the step
    finite: torch.Tensor | None = None  # [B] bool: every logit U_k + B_k finite (else verify nothing)


def markov_step_torch(
    w: HeadWeights,
    base_logits: torch.Tensor,
    prev: torch.Tensor,
    h: torch.Tensor,
    state: torch.Tensor | None,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    step: int,
    top_k: int = 0,
    want_probs: bool = False,
) -> StepResult:
    """PyTorch twin (and CPU path): the same ops as heads.*.step + draft.sequential_draft."""
    w1_prev = F.embedding(prev, w.w1)
    z, new_state = latent_torch(w, w1_prev, h.to(w1_prev.dtype), state)
    # W2 @ z^T, not z @ W2^T: for the few rows of a decode batch, CPU BLAS runs the [V, r] x [r, B]
    # form several times faster (measured: 0.7 vs 2.7 ms at B = 4, V = 49152, r = 64).
    logits = base_logits.float() + (w.w2 @ z.to(w.w2.dtype).t()).t().float()
    conf = confidence_torch(w, h, w1_prev)
    token, logprob, probs = sample_epilogue_torch(logits, temperature, seeds, step, top_k, want_probs)
    # A row sum is non-finite iff some logit is (or, harmlessly, if it overflows): one cheap reduction
    # instead of an elementwise isfinite over [B, V].
    return StepResult(token, logprob, conf, probs, new_state, torch.isfinite(logits.sum(-1)))


if HAVE_TRITON:
    from dspark_plugin.kernels import rng
    from dspark_plugin.kernels.epilogue import finish_plain, finish_topk, normalize_rows, scan_init, scan_tile
    from dspark_plugin.kernels.heads_fused import confidence, latent_triton, load_w1

    @triton.jit
    def tile_logits(U_ptr, stride_u, W2_ptr, z, rows, rmask, cols, cmask, R,
                    R_PAD: tl.constexpr, DOT_IEEE: tl.constexpr):
        """-> ([BLOCK_B, BLOCK_V] float32 logits U + z @ W2[cols]^T, -inf outside the valid rows/cols;
        [BLOCK_B] count of non-finite valid logits, so a broken row is reported, not sampled from)."""
        rr = tl.arange(0, R_PAD)
        w2 = tl.load(W2_ptr + cols.to(tl.int64)[:, None] * R + rr[None, :],
                     mask=cmask[:, None] & (rr[None, :] < R), other=0.0)
        if DOT_IEEE:
            bias = tl.dot(z, tl.trans(w2), input_precision="ieee")
        else:
            bias = tl.dot(z, tl.trans(w2))
        mask = rmask[:, None] & cmask[None, :]
        u = tl.load(U_ptr + rows.to(tl.int64)[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
        logit = u.to(tl.float32) + bias
        bad = tl.sum((mask & ~(tl.abs(logit) < float("inf"))).to(tl.int32), 1)
        return tl.where(mask, logit, float("-inf")), bad

    @triton.jit
    def _combine(rows, rmask, greedy, rk, topk, part_f_ptr, part_i_ptr, part_k_ptr,
                 BLOCK_B: tl.constexpr, NSPLIT: tl.constexpr, TOPK_PAD: tl.constexpr):
        sp = tl.arange(0, NSPLIT)
        cell = rows.to(tl.int64)[:, None] * NSPLIT + sp[None, :]
        bad = tl.sum(tl.load(part_i_ptr + cell * 3 + 2, mask=rmask[:, None], other=0, cache_modifier=".cg"), 1)
        if TOPK_PAD > 0:
            kk = tl.arange(0, TOPK_PAD)
            keys = tl.load(part_k_ptr + cell[:, :, None] * TOPK_PAD + kk[None, None, :],
                           mask=rmask[:, None, None], other=-9223372036854775807, cache_modifier=".cg")
            cand = tl.topk(tl.reshape(keys, [BLOCK_B, NSPLIT * TOPK_PAD]), TOPK_PAD)
            token, logprob, lse, thr = finish_topk(cand, greedy, rk, topk, TOPK_PAD)
            return token, logprob, lse, thr, bad
        neg = float("-inf")
        m = tl.load(part_f_ptr + cell * 5 + 0, mask=rmask[:, None], other=neg, cache_modifier=".cg")
        s = tl.load(part_f_ptr + cell * 5 + 1, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
        gv = tl.load(part_f_ptr + cell * 5 + 2, mask=rmask[:, None], other=neg, cache_modifier=".cg")
        zv = tl.load(part_f_ptr + cell * 5 + 3, mask=rmask[:, None], other=neg, cache_modifier=".cg")
        zy = tl.load(part_f_ptr + cell * 5 + 4, mask=rmask[:, None], other=neg, cache_modifier=".cg")
        gi = tl.load(part_i_ptr + cell * 3 + 0, mask=rmask[:, None], other=0, cache_modifier=".cg")
        zi = tl.load(part_i_ptr + cell * 3 + 1, mask=rmask[:, None], other=0, cache_modifier=".cg")
        big = tl.max(m, 1)
        safe = tl.where(big == neg, 0.0, big)
        s_tot = tl.sum(tl.where(m == neg, 0.0, s * tl.exp(m - safe[:, None])), 1)
        # first split holding the maximum: splits are in vocabulary order, so ties keep the smaller index
        gsel = tl.argmax(gv, 1)
        zsel = tl.argmax(zv, 1)
        g_idx = tl.sum(tl.where(sp[None, :] == gsel[:, None], gi, 0), 1)
        z_idx = tl.sum(tl.where(sp[None, :] == zsel[:, None], zi, 0), 1)
        z_y = tl.max(tl.where(sp[None, :] == zsel[:, None], zy, neg), 1)
        token, logprob, lse, thr = finish_plain(big, s_tot, g_idx, z_idx, z_y, greedy)
        return token, logprob, lse, thr, bad

    @triton.jit
    def _step_kernel(
        U_ptr, stride_u, Z_ptr, prev_ptr, W1_ptr, W2_ptr, temp_ptr, seed_ptr, step,
        H_ptr, stride_h, CW_ptr, CB_ptr,
        tok_ptr, logp_ptr, conf_ptr, fin_ptr, row_ptr, stride_row, aux_ptr,
        part_f_ptr, part_i_ptr, part_k_ptr, count_ptr,
        B, V, R, D, CHUNK, topk,
        BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
        NSPLIT: tl.constexpr, TOPK_PAD: tl.constexpr, GATHER: tl.constexpr, SAMPLE: tl.constexpr,
        HAS_CONF: tl.constexpr, CONF_MARKOV: tl.constexpr, WRITE_ROW: tl.constexpr,
        DOT_IEEE: tl.constexpr, TICKET: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rr = tl.arange(0, R_PAD)
        prev = tl.load(prev_ptr + rows, mask=rmask, other=0)
        w1 = load_w1(W1_ptr, prev, rmask, R, R_PAD)
        if GATHER:
            z = w1
        else:
            z = tl.load(Z_ptr + rows.to(tl.int64)[:, None] * R + rr[None, :],
                        mask=rmask[:, None] & (rr[None, :] < R), other=0.0)
        z = z.to(W2_ptr.dtype.element_ty)
        if HAS_CONF:
            if pid_s == 0:
                c = confidence(rows, rmask, w1, H_ptr, stride_h, CW_ptr, CB_ptr, R, D,
                               BLOCK_B, R_PAD, BLOCK_K, CONF_MARKOV)
                tl.store(conf_ptr + rows, c, mask=rmask)
        t = tl.load(temp_ptr + rows, mask=rmask, other=0.0)
        greedy = t <= 0
        tdiv = tl.where(greedy, 1.0, t)
        rk = rng.row_key(tl.load(seed_ptr + rows, mask=rmask, other=0), step)

        m, s, gv, gi, zv, zi, zy, run = scan_init(BLOCK_B, TOPK_PAD)
        nbad = tl.zeros([BLOCK_B], tl.int32)
        start = pid_s * CHUNK
        for off in range(0, CHUNK, BLOCK_V):
            lane = off + tl.arange(0, BLOCK_V)
            cols = start + lane
            cmask = (lane < CHUNK) & (cols < V)
            logit, bad = tile_logits(U_ptr, stride_u, W2_ptr, z, rows, rmask, cols, cmask, R, R_PAD, DOT_IEEE)
            nbad += bad
            y = logit / tdiv[:, None]
            if WRITE_ROW:
                tl.store(row_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :], y,
                         mask=rmask[:, None] & cmask[None, :])
            m, s, gv, gi, zv, zi, zy, run = scan_tile(logit, y, cols, rk, m, s, gv, gi, zv, zi, zy, run,
                                                      SAMPLE, TOPK_PAD, BLOCK_V)

        cell = rows.to(tl.int64) * NSPLIT + pid_s
        tl.store(part_i_ptr + cell * 3 + 2, nbad, mask=rmask)
        if TOPK_PAD > 0:
            kk = tl.arange(0, TOPK_PAD)
            tl.store(part_k_ptr + cell[:, None] * TOPK_PAD + kk[None, :], run, mask=rmask[:, None])
        else:
            tl.store(part_f_ptr + cell * 5 + 0, m, mask=rmask)
            tl.store(part_f_ptr + cell * 5 + 1, s, mask=rmask)
            tl.store(part_f_ptr + cell * 5 + 2, gv, mask=rmask)
            tl.store(part_f_ptr + cell * 5 + 3, zv, mask=rmask)
            tl.store(part_f_ptr + cell * 5 + 4, zy, mask=rmask)
            tl.store(part_i_ptr + cell * 3 + 0, gi, mask=rmask)
            tl.store(part_i_ptr + cell * 3 + 1, zi, mask=rmask)
        if TICKET:
            # Every thread's partial stores happen before the barrier; the acq_rel ticket then
            # publishes them (release) and the last program observes all splits (acquire).
            tl.debug_barrier()
            ticket = tl.atomic_add(count_ptr + pid_b, 1, sem="acq_rel")
            if ticket == NSPLIT - 1:
                tl.debug_barrier()
                token, logprob, lse, thr, bad = _combine(rows, rmask, greedy, rk, topk, part_f_ptr, part_i_ptr,
                                                         part_k_ptr, BLOCK_B, NSPLIT, TOPK_PAD)
                tl.store(tok_ptr + rows, token.to(tl.int64), mask=rmask)
                tl.store(fin_ptr + rows, (bad == 0).to(tl.int8), mask=rmask)
                tl.store(logp_ptr + rows, logprob, mask=rmask)
                tl.store(aux_ptr + rows * 2, lse, mask=rmask)
                tl.store(aux_ptr + rows * 2 + 1, thr, mask=rmask)
                tl.atomic_xchg(count_ptr + pid_b, 0)

    @triton.jit
    def _combine_kernel(temp_ptr, seed_ptr, step, tok_ptr, logp_ptr, fin_ptr, aux_ptr,
                        part_f_ptr, part_i_ptr, part_k_ptr, B, topk,
                        BLOCK_B: tl.constexpr, NSPLIT: tl.constexpr, TOPK_PAD: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        greedy = tl.load(temp_ptr + rows, mask=rmask, other=0.0) <= 0
        rk = rng.row_key(tl.load(seed_ptr + rows, mask=rmask, other=0), step)
        token, logprob, lse, thr, bad = _combine(rows, rmask, greedy, rk, topk, part_f_ptr, part_i_ptr,
                                                 part_k_ptr, BLOCK_B, NSPLIT, TOPK_PAD)
        tl.store(tok_ptr + rows, token.to(tl.int64), mask=rmask)
        tl.store(fin_ptr + rows, (bad == 0).to(tl.int8), mask=rmask)
        tl.store(logp_ptr + rows, logprob, mask=rmask)
        tl.store(aux_ptr + rows * 2, lse, mask=rmask)
        tl.store(aux_ptr + rows * 2 + 1, thr, mask=rmask)

    _WORKSPACE: dict = {}

    def _workspace(device: torch.device, b: int, nsplit: int, topk_pad: int, n_blocks: int):
        """Partials and ticket counters; cached on GPU (the kernel re-arms the counters itself)."""
        key = (str(device), b, nsplit, topk_pad, n_blocks)
        ws = _WORKSPACE.get(key) if device.type == "cuda" else None
        if ws is None:
            ws = (
                alloc(b * nsplit * 5, device=device, dtype=torch.float32),
                alloc(b * nsplit * 3, device=device, dtype=torch.int32),
                alloc(max(1, b * nsplit * topk_pad), device=device, dtype=torch.int64),
                torch.zeros(n_blocks, device=device, dtype=torch.int32),
                alloc(b * 2, device=device, dtype=torch.float32),
            )
            if device.type == "cuda":
                _WORKSPACE[key] = ws
        return ws

    def launch_config(b: int, v: int, r: int, device: torch.device, top_k_pad: int,
                      block_b: int | None = None, block_v: int | None = None, nsplit: int | None = None):
        if block_b is None:
            # The interpreter accepts tl.dot with fewer than 16 rows; compiled code needs 16.
            block_b = min(16, next_pow2(b)) if interpreting() else (16 if b <= 16 or top_k_pad else 32 if b <= 32 else 64)
        if block_v is None:
            if interpreting():
                block_v = 128 if top_k_pad else 1024  # interpreted tl.topk costs ~ rows x width
            else:
                block_v = 128 if block_b <= 16 and r <= 128 else 64
        block_v = max(block_v, top_k_pad, 16)
        n_blocks = triton.cdiv(b, block_b)
        if nsplit is None:
            if interpreting():
                nsplit = 1
            else:
                want = max(1, (2 * num_sms(device)) // n_blocks)
                nsplit = min(next_pow2(want), next_pow2(triton.cdiv(v, block_v)), 512)
                if top_k_pad:
                    nsplit = max(1, min(nsplit, MAX_TOPK_CANDIDATES // top_k_pad))
        chunk = triton.cdiv(triton.cdiv(v, nsplit), block_v) * block_v
        return block_b, block_v, nsplit, chunk, n_blocks

    def markov_step_triton(
        w: HeadWeights,
        base_logits: torch.Tensor,
        prev: torch.Tensor,
        h: torch.Tensor,
        state: torch.Tensor | None,
        temperature: torch.Tensor,
        seeds: torch.Tensor,
        step: int,
        top_k: int = 0,
        want_probs: bool = False,
        *,
        sample: bool | None = None,
        block_b: int | None = None,
        block_v: int | None = None,
        nsplit: int | None = None,
        ticket: bool | None = None,
    ) -> StepResult:
        b, v = base_logits.shape
        r, d = w.rank, h.shape[-1]
        dev = base_logits.device
        if 0 < top_k < v and top_k > MAX_TOP_K:
            raise ValueError(f"fused top-k supports k <= {MAX_TOP_K}, got {top_k}")
        topk_pad = next_pow2(top_k) if 0 < top_k < v else 0
        if sample is None:
            sample = bool((temperature > 0).any())
        if ticket is None:
            ticket = not envs.read(envs.KERNELS_TWO_LAUNCH)
        bb, bv, ns, chunk, n_blocks = launch_config(b, v, r, dev, topk_pad, block_b, block_v, nsplit)
        if w.head_type == "vanilla":
            z, new_state, gather = w.w1, state, True
        else:
            z, new_state = latent_triton(w, prev, h, state)
            gather = False
        if base_logits.stride(-1) != 1:
            base_logits = base_logits.contiguous()
        h = h if h.stride(-1) == 1 else h.contiguous()
        token = alloc(b, device=dev, dtype=torch.int64)
        logprob = alloc(b, device=dev, dtype=torch.float32)
        has_conf = w.conf_w is not None
        conf = alloc(b, device=dev, dtype=torch.float32) if has_conf else None
        probs = alloc(b, v, device=dev, dtype=torch.float32) if want_probs else None
        finite = alloc(b, device=dev, dtype=torch.int8)
        part_f, part_i, part_k, count, aux = _workspace(dev, b, ns, topk_pad, n_blocks)
        temperature = temperature.to(device=dev, dtype=torch.float32).contiguous()
        seeds = seeds.to(device=dev, dtype=torch.int64).contiguous()
        _step_kernel[(n_blocks, ns)](
            base_logits, base_logits.stride(0), z, prev, w.w1, w.w2, temperature, seeds, step,
            h, h.stride(0), w.conf_w if has_conf else w.w1, w.conf_b if has_conf else w.w1,
            token, logprob, conf if has_conf else logprob, finite, probs if want_probs else logprob,
            v if want_probs else 0, aux, part_f, part_i, part_k, count,
            b, v, r, d, chunk, top_k,
            BLOCK_B=bb, BLOCK_V=bv, R_PAD=max(16, next_pow2(r)), BLOCK_K=min(128, max(16, next_pow2(d))),
            NSPLIT=ns, TOPK_PAD=topk_pad, GATHER=gather, SAMPLE=sample or topk_pad > 0, HAS_CONF=has_conf,
            CONF_MARKOV=w.conf_with_markov, WRITE_ROW=want_probs, DOT_IEEE=dot_ieee(w.w2.dtype),
            TICKET=ticket, num_warps=4 if bb <= 16 else 8,
        )
        if not ticket:
            _combine_kernel[(n_blocks,)](temperature, seeds, step, token, logprob, finite, aux, part_f, part_i, part_k,
                                         b, top_k, BLOCK_B=bb, NSPLIT=ns, TOPK_PAD=topk_pad)
        if want_probs:
            normalize_rows(probs, token, aux, temperature)
        return StepResult(token, logprob, conf, probs, new_state, finite.bool())
