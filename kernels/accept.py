"""Variable-length acceptance of a drafted prefix, one program per request (docs/algorithm.md §1.6).

Semantics are those of dspark_plugin.decode.verify: greedy accepts while the draft equals the target
argmax; rejection accepts x_j when u_j * p_d(x_j) < p_t(x_j), then draws the correction from
normalise(max(0, p_t - p_d)) (p_t when that has no mass) or the bonus from p_t. The uniforms come
in as tensors (u_accept [B, g], u_sample [B]) so the kernel and its twin make the same choices;
the final draw is an inverse-CDF lookup. A program stops reading target rows at the first
rejection, so rows past it are never touched. Output: tokens [B, g+1] (accepted drafts, then the
correction/bonus, then -1) and num_accepted [B].
"""
from __future__ import annotations

import torch

from dspark_plugin.kernels._triton import HAVE_TRITON, alloc, interpreting, next_pow2, tl, triton


def _accepted_prefix(accept: torch.Tensor, verify_len: torch.Tensor) -> torch.Tensor:
    g = accept.shape[1]
    in_prefix = torch.arange(g, device=accept.device)[None, :] < verify_len[:, None]
    return (accept & in_prefix).long().cumprod(dim=1).sum(dim=1)


def _assemble(draft_tokens: torch.Tensor, n: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, g = draft_tokens.shape
    j = torch.arange(g + 1, device=draft_tokens.device)[None, :]
    padded = torch.cat([draft_tokens, draft_tokens.new_full((b, 1), -1)], dim=1)
    tokens = torch.where(j < n[:, None], padded, torch.full_like(padded, -1))
    tokens.scatter_(1, n[:, None], last[:, None].to(tokens.dtype))
    return tokens, n


def accept_greedy_torch(draft_tokens: torch.Tensor, target_logits: torch.Tensor, verify_len: torch.Tensor):
    """draft_tokens [B, g], target_logits [B, g+1, V], verify_len [B] -> (tokens [B, g+1], num_accepted [B])."""
    target = target_logits.argmax(dim=-1)
    n = _accepted_prefix(draft_tokens == target[:, :-1], verify_len.to(draft_tokens.device))
    return _assemble(draft_tokens, n, target.gather(1, n[:, None]).squeeze(1))


def inverse_cdf_torch(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [B, V] >= 0 (unnormalised), u [B] in [0, 1) -> first index whose cdf exceeds u * total."""
    cdf = weights.cumsum(-1)
    target = u.float() * weights.sum(-1)
    hit = cdf > target[:, None]
    idx = torch.arange(weights.shape[-1], device=weights.device)
    last = torch.where(weights > 0, idx[None, :], -1).amax(-1)
    first = torch.where(hit, idx[None, :], weights.shape[-1]).amin(-1)
    return torch.where(hit.any(-1), first, last)


def accept_rejection_torch(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    verify_len: torch.Tensor,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
):
    b, g = draft_tokens.shape
    verify_len = verify_len.to(draft_tokens.device)
    idx = draft_tokens.clamp(min=0)[..., None]
    p_d = draft_probs.gather(2, idx).squeeze(2).float()
    p_t = target_probs[:, :g].gather(2, idx).squeeze(2).float()
    n = _accepted_prefix(u_accept.float() * p_d < p_t, verify_len)
    rows = torch.arange(b, device=draft_tokens.device)
    pt_n = target_probs[rows, n].float()
    pd_n = draft_probs[rows, n.clamp(max=g - 1)].float() if g else torch.zeros_like(pt_n)
    residual = (pt_n - pd_n).clamp(min=0)
    use_res = (n < verify_len) & (residual.sum(-1) > 0)
    weights = torch.where(use_res[:, None], residual, pt_n)
    return _assemble(draft_tokens, n, inverse_cdf_torch(weights, u_sample))


if HAVE_TRITON:

    @triton.jit
    def _row_argmax(ptr, V, BLOCK_V: tl.constexpr):
        best_v = float("-inf")
        best_i = 0
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            tv = tl.max(x, 0)
            ti = tl.argmax(x, 0) + off
            better = tv > best_v
            best_i = tl.where(better, ti, best_i)
            best_v = tl.where(better, tv, best_v)
        return best_i

    @triton.jit
    def _finish_row(out_ptr, n_ptr, b, n, G, G1_PAD: tl.constexpr):
        jj = tl.arange(0, G1_PAD)
        tl.store(out_ptr + b * (G + 1) + jj, tl.full([G1_PAD], -1, tl.int64), mask=(jj > n) & (jj < G + 1))
        tl.store(n_ptr + b, n.to(tl.int64))

    @triton.jit
    def _accept_greedy_kernel(draft_ptr, T_ptr, vlen_ptr, out_ptr, n_ptr, G, V,
                              BLOCK_V: tl.constexpr, G1_PAD: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        vlen = tl.load(vlen_ptr + b)
        n = tl.full([], -1, tl.int32)
        j = tl.full([], 0, tl.int32)
        while n < 0:
            t = _row_argmax(T_ptr + (b * (G + 1) + j) * V, V, BLOCK_V)
            d = tl.load(draft_ptr + b * G + j, mask=j < G, other=-1)
            acc = (j < vlen) & (d == t)
            tl.store(out_ptr + b * (G + 1) + j, tl.where(acc, d, t.to(tl.int64)))
            n = tl.where(acc, n, j)
            j += 1
        _finish_row(out_ptr, n_ptr, b, n, G, G1_PAD)

    @triton.jit
    def _accept_rejection_kernel(draft_ptr, Dp_ptr, Tp_ptr, vlen_ptr, ua_ptr, us_ptr, out_ptr, n_ptr, G, V,
                                 BLOCK_V: tl.constexpr, G1_PAD: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        vlen = tl.load(vlen_ptr + b)
        n = tl.full([], -1, tl.int32)
        j = tl.full([], 0, tl.int32)
        while n < 0:
            inb = j < vlen
            x = tl.load(draft_ptr + b * G + j, mask=inb, other=0)
            pd = tl.load(Dp_ptr + (b * G + j) * V + x, mask=inb, other=0.0).to(tl.float32)
            pt = tl.load(Tp_ptr + (b * (G + 1) + j) * V + x, mask=inb, other=0.0).to(tl.float32)
            u = tl.load(ua_ptr + b * G + j, mask=inb, other=1.0)
            acc = inb & (u * pd < pt)
            tl.store(out_ptr + b * (G + 1) + j, x, mask=acc)
            n = tl.where(acc, n, j)
            j += 1
        rejected = n < vlen
        pt_row = Tp_ptr + (b * (G + 1) + n) * V
        # g = 0 forces verify_len = 0: no rejection, and the launcher passes a valid dummy row.
        pd_row = Dp_ptr + (b * G + tl.maximum(tl.minimum(n, G - 1), 0)) * V
        has_pd = rejected
        mass = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            cm = cols < V
            pt = tl.load(pt_row + cols, mask=cm, other=0.0).to(tl.float32)
            pd = tl.where(has_pd, tl.load(pd_row + cols, mask=cm, other=0.0).to(tl.float32), 0.0)
            mass += tl.sum(tl.maximum(pt - pd, 0.0), 0)
        use_res = rejected & (mass > 0)
        total = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            cm = cols < V
            pt = tl.load(pt_row + cols, mask=cm, other=0.0).to(tl.float32)
            pd = tl.where(has_pd, tl.load(pd_row + cols, mask=cm, other=0.0).to(tl.float32), 0.0)
            total += tl.sum(tl.where(use_res, tl.maximum(pt - pd, 0.0), pt), 0)
        target = tl.load(us_ptr + b).to(tl.float32) * total
        run = 0.0
        found = V
        last = -1
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            cm = cols < V
            pt = tl.load(pt_row + cols, mask=cm, other=0.0).to(tl.float32)
            pd = tl.where(has_pd, tl.load(pd_row + cols, mask=cm, other=0.0).to(tl.float32), 0.0)
            w = tl.where(cm, tl.where(use_res, tl.maximum(pt - pd, 0.0), pt), 0.0)
            cdf = tl.cumsum(w, 0) + run
            first = tl.min(tl.where((cdf > target) & cm, cols, V), 0)
            found = tl.minimum(found, first)
            last = tl.maximum(last, tl.max(tl.where(w > 0, cols, -1), 0))
            run += tl.sum(w, 0)
        token = tl.where(found < V, found, last)
        tl.store(out_ptr + b * (G + 1) + n, token.to(tl.int64))
        _finish_row(out_ptr, n_ptr, b, n, G, G1_PAD)

    def _block_v(v: int) -> int:
        return min(4096 if interpreting() else 1024, next_pow2(v))

    def accept_greedy_triton(draft_tokens: torch.Tensor, target_logits: torch.Tensor, verify_len: torch.Tensor):
        b, g = draft_tokens.shape
        v = target_logits.shape[-1]
        tokens = alloc(b, g + 1, device=draft_tokens.device, dtype=torch.int64)
        n = alloc(b, device=draft_tokens.device, dtype=torch.int64)
        _accept_greedy_kernel[(b,)](draft_tokens.to(torch.int64).contiguous(), target_logits.contiguous(),
                                    verify_len.to(device=draft_tokens.device, dtype=torch.int64).contiguous(),
                                    tokens, n, g, v, BLOCK_V=_block_v(v), G1_PAD=next_pow2(g + 1))
        return tokens, n

    def accept_rejection_triton(draft_tokens, draft_probs, target_probs, verify_len, u_accept, u_sample):
        b, g = draft_tokens.shape
        v = target_probs.shape[-1]
        dev = draft_tokens.device
        tokens = alloc(b, g + 1, device=dev, dtype=torch.int64)
        n = alloc(b, device=dev, dtype=torch.int64)
        _accept_rejection_kernel[(b,)](
            draft_tokens.to(torch.int64).contiguous(), (draft_probs if g else target_probs).contiguous(),
            target_probs.contiguous(),
            verify_len.to(device=dev, dtype=torch.int64).contiguous(),
            u_accept.to(device=dev, dtype=torch.float32).contiguous(),
            u_sample.to(device=dev, dtype=torch.float32).contiguous(),
            tokens, n, g, v, BLOCK_V=_block_v(v), G1_PAD=next_pow2(g + 1))
        return tokens, n
