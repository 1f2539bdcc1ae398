"""Whole-block drafting: all gamma sequential steps in one launch, the head state kept on chip.

Each program owns a block of requests and walks k = 1..gamma itself, scanning the whole
vocabulary per step, so the step-to-step dependency (x_k feeds step k+1) never leaves the
program. That trades vocabulary parallelism for zero inter-step launches: the right choice for
small batches x small vocabularies or when CUDA graphs are unavailable; otherwise run
markov_step per step (split vocabulary) under a CUDA graph.
"""
from __future__ import annotations

import dataclasses

import torch

from dspark_plugin.kernels._triton import HAVE_TRITON, alloc, dot_ieee, interpreting, next_pow2, tl, triton
from dspark_plugin.kernels.heads_fused import init_state_torch
from dspark_plugin.kernels.markov_step import MAX_TOP_K, markov_step_torch
from dspark_plugin.kernels.weights import HeadWeights


# "auto" (dispatch.use_block_loop) takes the block loop only up to this vocabulary. One program
# scans all V every step, while markov_step splits V across the GPU; the crossover has not been
# measured (no GPU lent yet), so this is the "small vocabularies" above made concrete, a guess
# for the GPU table to replace. DSPARK_BLOCK_LOOP=on bypasses it.
AUTO_MAX_VOCAB = 32768


def fits(v: int, top_k: int) -> bool:
    """Whether the block kernel handles this vocabulary / top-k (the running top-k keys live in
    registers, so k is capped as in markov_step)."""
    return not (0 < top_k < v and top_k > MAX_TOP_K)


@dataclasses.dataclass
class BlockResult:
    tokens: torch.Tensor                # [B, g] int64
    logprobs: torch.Tensor              # [B, g] float32
    conf_logits: torch.Tensor | None    # [B, g] float32
    probs: torch.Tensor | None          # [B, g, V] float32
    finite: torch.Tensor | None = None  # [B, g] bool: all logits of the step finite


def draft_block_torch(
    w: HeadWeights,
    base_logits: torch.Tensor,
    h: torch.Tensor,
    anchor: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    step0: int = 0,
    top_k: int = 0,
    want_probs: bool = False,
) -> BlockResult:
    """Twin: base_logits [B, g, V], h [B, g, d], anchor [B]; step k uses RNG counter step0 + k."""
    b, g, v = base_logits.shape
    state = init_state_torch(w, b)
    prev = anchor
    outs = []
    for k in range(g):
        r = markov_step_torch(w, base_logits[:, k], prev, h[:, k], state, temperature, seeds, step0 + k,
                              top_k, want_probs)
        outs.append(r)
        prev, state = r.token, r.state
    conf = None if outs[0].conf_logit is None else torch.stack([o.conf_logit for o in outs], 1)
    probs = torch.stack([o.probs for o in outs], 1) if want_probs else None
    return BlockResult(torch.stack([o.token for o in outs], 1), torch.stack([o.logprob for o in outs], 1),
                       conf, probs, torch.stack([o.finite for o in outs], 1))


if HAVE_TRITON:
    from dspark_plugin.kernels import rng
    from dspark_plugin.kernels.epilogue import finish_plain, finish_topk, normalize_rows, scan_init, scan_tile
    from dspark_plugin.kernels.heads_fused import KINDS, confidence, latent, load_w1
    from dspark_plugin.kernels.markov_step import tile_logits

    @triton.jit
    def _block_kernel(
        U_ptr, stride_ub, stride_uk, H_ptr, stride_hb, stride_hk, anchor_ptr,
        W1_ptr, W2_ptr, P_ptr, PB_ptr, temp_ptr, seed_ptr, step0, CW_ptr, CB_ptr,
        tok_ptr, logp_ptr, conf_ptr, fin_ptr, row_ptr, aux_ptr,
        B, V, R, D, G, topk,
        BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
        TOPK_PAD: tl.constexpr, KIND: tl.constexpr, SAMPLE: tl.constexpr, HAS_CONF: tl.constexpr,
        CONF_MARKOV: tl.constexpr, WRITE_ROW: tl.constexpr, DOT_IEEE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rows64 = rows.to(tl.int64)
        prev = tl.load(anchor_ptr + rows, mask=rmask, other=0).to(tl.int64)
        s = tl.zeros([BLOCK_B, R_PAD], tl.float32)  # RNN s_0 = 0
        t = tl.load(temp_ptr + rows, mask=rmask, other=0.0)
        greedy = t <= 0
        tdiv = tl.where(greedy, 1.0, t)
        seeds = tl.load(seed_ptr + rows, mask=rmask, other=0)
        for k in range(G):
            hk_ptr = H_ptr + k * stride_hk
            w1 = load_w1(W1_ptr, prev, rmask, R, R_PAD)
            z, s = latent(rows, rmask, w1, s, hk_ptr, stride_hb, P_ptr, PB_ptr, R, D,
                          BLOCK_B, R_PAD, BLOCK_K, KIND, DOT_IEEE)
            z = z.to(W2_ptr.dtype.element_ty)
            cell = rows64 * G + k
            if HAS_CONF:
                c = confidence(rows, rmask, w1, hk_ptr, stride_hb, CW_ptr, CB_ptr, R, D,
                               BLOCK_B, R_PAD, BLOCK_K, CONF_MARKOV)
                tl.store(conf_ptr + cell, c, mask=rmask)
            rk = rng.row_key(seeds, step0 + k)
            m, sm, gv, gi, zv, zi, zy, run = scan_init(BLOCK_B, TOPK_PAD)
            nbad = tl.zeros([BLOCK_B], tl.int32)
            for off in range(0, V, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                cmask = cols < V
                logit, bad = tile_logits(U_ptr + k * stride_uk, stride_ub, W2_ptr, z, rows, rmask, cols, cmask,
                                    R, R_PAD, DOT_IEEE)
                nbad += bad
                y = logit / tdiv[:, None]
                if WRITE_ROW:
                    tl.store(row_ptr + cell[:, None] * V + cols[None, :], y, mask=rmask[:, None] & cmask[None, :])
                m, sm, gv, gi, zv, zi, zy, run = scan_tile(logit, y, cols, rk, m, sm, gv, gi, zv, zi, zy, run,
                                                           SAMPLE, TOPK_PAD, BLOCK_V)
            if TOPK_PAD > 0:
                token, logprob, lse, thr = finish_topk(run, greedy, rk, topk, TOPK_PAD)
            else:
                token, logprob, lse, thr = finish_plain(m, sm, gi, zi, zy, greedy)
            token = token.to(tl.int64)
            tl.store(tok_ptr + cell, token, mask=rmask)
            tl.store(logp_ptr + cell, logprob, mask=rmask)
            tl.store(fin_ptr + cell, (nbad == 0).to(tl.int8), mask=rmask)
            tl.store(aux_ptr + cell * 2, lse, mask=rmask)
            tl.store(aux_ptr + cell * 2 + 1, thr, mask=rmask)
            prev = token

    def draft_block_triton(
        w: HeadWeights,
        base_logits: torch.Tensor,
        h: torch.Tensor,
        anchor: torch.Tensor,
        temperature: torch.Tensor,
        seeds: torch.Tensor,
        step0: int = 0,
        top_k: int = 0,
        want_probs: bool = False,
        *,
        sample: bool | None = None,
        block_b: int | None = None,
        block_v: int | None = None,
    ) -> BlockResult:
        b, g, v = base_logits.shape
        r, d = w.rank, h.shape[-1]
        dev = base_logits.device
        if 0 < top_k < v and top_k > MAX_TOP_K:
            raise ValueError(f"fused top-k supports k <= {MAX_TOP_K}, got {top_k}")
        topk_pad = next_pow2(top_k) if 0 < top_k < v else 0
        if sample is None:
            sample = bool((temperature > 0).any())
        if block_b is None:
            block_b = min(16, next_pow2(b)) if interpreting() else (16 if b <= 16 else 32)
        if block_v is None:
            block_v = (128 if topk_pad else 1024) if interpreting() else 64
        block_v = max(block_v, topk_pad, 16)
        if base_logits.stride(-1) != 1:
            base_logits = base_logits.contiguous()
        if h.stride(-1) != 1:
            h = h.contiguous()
        tokens = alloc(b, g, device=dev, dtype=torch.int64)
        logprobs = alloc(b, g, device=dev, dtype=torch.float32)
        has_conf = w.conf_w is not None
        conf = alloc(b, g, device=dev, dtype=torch.float32) if has_conf else None
        probs = alloc(b, g, v, device=dev, dtype=torch.float32) if want_probs else None
        aux = alloc(b, g, 2, device=dev, dtype=torch.float32)
        finite = alloc(b, g, device=dev, dtype=torch.int8)
        temperature = temperature.to(device=dev, dtype=torch.float32).contiguous()
        seeds = seeds.to(device=dev, dtype=torch.int64).contiguous()
        proj_w = w.proj_w if w.proj_w is not None else w.w1
        proj_b = w.proj_b if w.proj_b is not None else proj_w.new_zeros(proj_w.shape[0])
        _block_kernel[(triton.cdiv(b, block_b),)](
            base_logits, base_logits.stride(0), base_logits.stride(1), h, h.stride(0), h.stride(1), anchor,
            w.w1, w.w2, proj_w, proj_b, temperature, seeds, step0,
            w.conf_w if has_conf else w.w1, w.conf_b if has_conf else w.w1,
            tokens, logprobs, conf if has_conf else logprobs, finite, probs if want_probs else logprobs, aux,
            b, v, r, d, g, top_k,
            BLOCK_B=block_b, BLOCK_V=block_v, R_PAD=max(16, next_pow2(r)),
            BLOCK_K=min(128, max(16, next_pow2(d))), TOPK_PAD=topk_pad, KIND=KINDS[w.head_type],
            SAMPLE=sample or topk_pad > 0, HAS_CONF=has_conf, CONF_MARKOV=w.conf_with_markov,
            WRITE_ROW=want_probs, DOT_IEEE=dot_ieee(w.w2.dtype), num_warps=4 if block_b <= 16 else 8,
        )
        if want_probs:
            normalize_rows(probs.view(b * g, v), tokens.view(-1), aux.view(-1, 2),
                           temperature[:, None].expand(b, g).reshape(-1).contiguous())
        return BlockResult(tokens, logprobs, conf, probs, finite.bool())
