"""Sampling epilogue shared by every drafting kernel: online logsumexp, greedy argmax, Gumbel-max
with the counter RNG, and exact top-k through packed (value, index) keys.

Per row the V axis is scanned in tiles; each tile updates running statistics so no [B, V]
temporary is ever materialised. Top-k keeps the running k best keys: a key packs the scaled logit
(as an order-preserving int32) above the inverted vocab index, so sorting keys sorts by value and
breaks ties towards the smaller index, the same order torch.argmax uses.
"""
from __future__ import annotations

import torch

from dspark_plugin.kernels._triton import HAVE_TRITON, tl, triton
from dspark_plugin.kernels.rng import gumbel_torch

INDEX_MAX = 2 ** 31 - 1


def scaled_logits_torch(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32, temperature [B] -> (greedy [B], y = logits / T with T = 1 for greedy)."""
    t = temperature.to(torch.float32)
    greedy = t <= 0
    return greedy, logits / torch.where(greedy, torch.ones_like(t), t)[:, None]


def sample_epilogue_torch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    step: int,
    top_k: int = 0,
    want_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Twin of the kernels' epilogue: logits [B, V] -> (token [B], logprob [B], probs [B, V] | None).

    Greedy rows (temperature <= 0): argmax, logprob 0, one-hot probs. Sampled rows: Gumbel-max over
    softmax(logits / T) restricted to the top-k (threshold semantics, as sampling.logits_to_probs).
    """
    logits = logits.float()
    v = logits.shape[-1]
    if not want_probs and bool((temperature <= 0).all()):
        # all-greedy fast path (the CPU drafting loop): no noise, no normaliser needed
        return logits.argmax(-1), torch.zeros(logits.shape[0], device=logits.device), None
    greedy, y = scaled_logits_torch(logits, temperature)
    if 0 < top_k < v:
        kth = torch.topk(y, top_k, dim=-1).values[:, -1:]
        y = y.masked_fill(y < kth, float("-inf"))
    lse = torch.logsumexp(y, dim=-1)
    z = y + gumbel_torch(seeds, step, v)
    token = torch.where(greedy, logits.argmax(-1), z.argmax(-1))
    logprob = torch.where(greedy, torch.zeros_like(lse), y.gather(1, token[:, None]).squeeze(1) - lse)
    probs = None
    if want_probs:
        probs = torch.exp(y - lse[:, None])
        one_hot = torch.zeros_like(probs).scatter_(1, token[:, None], 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return token, logprob, probs


def topk_keys_torch(y: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Packed sortable keys (value high, inverted index low) in int64; used by the admission twin."""
    bits = y.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered << 32) | (INDEX_MAX - cols.to(torch.int64))


if HAVE_TRITON:
    from dspark_plugin.kernels import rng

    @triton.jit
    def pack_keys(y, cols):
        bits = y.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        return (ordered.to(tl.int64) << 32) | (2147483647 - cols).to(tl.int64)

    @triton.jit
    def unpack_keys(keys):
        hi = (keys >> 32).to(tl.int32)
        bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
        idx = 2147483647 - (keys & 0xFFFFFFFF).to(tl.int32)
        return bits.to(tl.float32, bitcast=True), idx

    @triton.jit
    def scan_init(BLOCK_B: tl.constexpr, TOPK_PAD: tl.constexpr):
        neg = tl.full([BLOCK_B], float("-inf"), tl.float32)
        zero_i = tl.zeros([BLOCK_B], tl.int32)
        run = tl.full([BLOCK_B, TOPK_PAD if TOPK_PAD > 0 else 1], -9223372036854775807, tl.int64)
        # m, s, greedy value/index, gumbel value/index, y at the gumbel index, top-k keys
        return neg, tl.zeros([BLOCK_B], tl.float32), neg, zero_i, neg, zero_i, neg, run

    @triton.jit
    def scan_tile(logit, y, cols, rk, m, s, gv, gi, zv, zi, zy, run,
                  SAMPLE: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
        """Fold one [BLOCK_B, BLOCK_V] tile (masked entries = -inf) into the running statistics."""
        if TOPK_PAD > 0:
            keys = pack_keys(y, cols[None, :])
            tile_best = tl.topk(keys, TOPK_PAD)
            both = tl.reshape(tl.join(run, tile_best), [run.shape[0], 2 * TOPK_PAD])
            run = tl.topk(both, TOPK_PAD)
        else:
            tv = tl.max(logit, 1)
            ti = tl.argmax(logit, 1) + tl.min(cols, 0)
            better = tv > gv  # strict: ties keep the earlier (smaller) index, as torch.argmax
            gi = tl.where(better, ti, gi)
            gv = tl.where(better, tv, gv)
            if SAMPLE:
                mt = tl.max(y, 1)
                m_new = tl.maximum(m, mt)
                alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
                p = tl.where(y == float("-inf"), 0.0, tl.exp(y - m_new[:, None]))
                s = s * alpha + tl.sum(p, 1)
                m = m_new
                z = y + rng.gumbel(rk[:, None], cols[None, :])
                zt = tl.max(z, 1)
                zit = tl.argmax(z, 1)
                lane = tl.arange(0, BLOCK_V)
                yt = tl.max(tl.where(lane[None, :] == zit[:, None], y, float("-inf")), 1)
                better = zt > zv
                zi = tl.where(better, zit + tl.min(cols, 0), zi)
                zy = tl.where(better, yt, zy)
                zv = tl.where(better, zt, zv)
        return m, s, gv, gi, zv, zi, zy, run

    @triton.jit
    def finish_topk(cand, greedy, rk, topk, TOPK_PAD: tl.constexpr):
        """cand [BLOCK_B, TOPK_PAD] best keys (sorted, largest first) -> token, logprob, lse, threshold."""
        y, idx = unpack_keys(cand)
        lane = tl.arange(0, TOPK_PAD)
        kth = tl.max(tl.where(lane[None, :] == topk - 1, y, float("-inf")), 1)
        keep = y >= kth[:, None]
        top = tl.max(y, 1)
        lse = top + tl.log(tl.sum(tl.where(keep, tl.exp(y - top[:, None]), 0.0), 1))
        z = tl.where(keep, y + rng.gumbel(rk[:, None], idx), float("-inf"))
        pos = tl.argmax(z, 1)
        hit = lane[None, :] == pos[:, None]
        zi = tl.max(tl.where(hit, idx, -1), 1)
        zy = tl.max(tl.where(hit, y, float("-inf")), 1)
        first = tl.max(tl.where(lane[None, :] == 0, idx, -1), 1)
        token = tl.where(greedy, first, zi)
        logprob = tl.where(greedy, 0.0, zy - lse)
        return token, logprob, lse, kth

    @triton.jit
    def finish_plain(m, s, gi, zi, zy, greedy):
        lse = m + tl.log(s)
        token = tl.where(greedy, gi, zi)
        logprob = tl.where(greedy, 0.0, zy - lse)
        return token, logprob, lse, tl.full(lse.shape, float("-inf"), tl.float32)

    @triton.jit
    def _normalize_rows_kernel(row_ptr, stride_row, tok_ptr, aux_ptr, temp_ptr, n_rows, V,
                               BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
        """Scaled logits in place -> probabilities (one-hot for greedy rows, 0 below the top-k)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        rmask = rows < n_rows
        mask = rmask[:, None] & (cols[None, :] < V)
        ptrs = row_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
        y = tl.load(ptrs, mask=mask, other=float("-inf"))
        lse = tl.load(aux_ptr + rows * 2, mask=rmask, other=0.0)
        thr = tl.load(aux_ptr + rows * 2 + 1, mask=rmask, other=0.0)
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
        greedy = tl.load(temp_ptr + rows, mask=rmask, other=0.0) <= 0
        p = tl.where(y >= thr[:, None], tl.exp(y - lse[:, None]), 0.0)
        one_hot = tl.where(cols[None, :] == tok[:, None], 1.0, 0.0)
        tl.store(ptrs, tl.where(greedy[:, None], one_hot, p), mask=mask)

    def normalize_rows(rows: torch.Tensor, token: torch.Tensor, aux: torch.Tensor, temperature: torch.Tensor) -> None:
        """rows [N, V] float32 scaled logits -> probabilities, in place (one launch)."""
        n, v = rows.shape
        block_r, block_v = (4, 1024) if not rows.is_cuda else (1, 2048)
        grid = (triton.cdiv(n, block_r), triton.cdiv(v, block_v))
        _normalize_rows_kernel[grid](rows, rows.stride(0), token, aux, temperature, n, v,
                                     BLOCK_R=block_r, BLOCK_V=block_v)
