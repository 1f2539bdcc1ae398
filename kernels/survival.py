"""Prefix survival and the admission step of the lossless scheduler.

Prefix survival a_{r,j} = prod_{i<=j} c_{r,i}. Admission: given survivals a [R, g] and a token
budget K, verify the K largest a_{r,j} across all requests. Because a is non-increasing along j
and ties are broken towards the smaller j, then the smaller r (the order of
dspark_plugin.policy.verify_planner._admission_order, so the scheduler's early stop and its top-K agree on
ties), the admitted set is a prefix per request, so the result is a verify length per request.
Ordering uses packed int64 keys (value, inverted j-major flat index j * R + r), which the kernel
and the twin compute identically, so both select the very same set.
"""
from __future__ import annotations

import torch

from dspark_plugin.kernels._triton import HAVE_TRITON, alloc, next_pow2, tl, triton
from dspark_plugin.kernels.epilogue import topk_keys_torch

MAX_ADMIT_ENTRIES = 1 << 15


def prefix_survival_torch(conf: torch.Tensor) -> torch.Tensor:
    """conf [R, g] confidences in [0, 1] -> survivals [R, g] float32."""
    return conf.float().cumprod(dim=-1)


def admit_topk_torch(survival: torch.Tensor, budget: int | torch.Tensor) -> torch.Tensor:
    """survival [R, g], budget K -> verify lengths [R] int64 (sum = min(K, R*g))."""
    r, g = survival.shape
    k = int(budget)
    if k <= 0 or r * g == 0:
        return torch.zeros(r, dtype=torch.int64, device=survival.device)
    # j-major: among equal values the smaller j wins, then the smaller r (any stride >= r works)
    flat = torch.arange(g, device=survival.device)[None, :] * r + torch.arange(r, device=survival.device)[:, None]
    keys = topk_keys_torch(survival.float(), flat)
    kth = torch.topk(keys.flatten(), min(k, r * g)).values[-1]
    return (keys >= kth).sum(dim=1)


if HAVE_TRITON:
    from dspark_plugin.kernels.epilogue import pack_keys

    @triton.jit
    def _survival_kernel(c_ptr, a_ptr, R, G, BLOCK_R: tl.constexpr, G_PAD: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, G_PAD)
        mask = (rows[:, None] < R) & (j[None, :] < G)
        off = rows.to(tl.int64)[:, None] * G + j[None, :]
        c = tl.load(c_ptr + off, mask=mask, other=1.0).to(tl.float32)
        tl.store(a_ptr + off, tl.cumprod(c, axis=1), mask=mask)

    def prefix_survival_triton(conf: torch.Tensor) -> torch.Tensor:
        r, g = conf.shape
        conf = conf.contiguous()
        out = alloc(r, g, device=conf.device, dtype=torch.float32)
        block_r = min(64, next_pow2(r))
        _survival_kernel[(triton.cdiv(r, block_r),)](conf, out, r, g, BLOCK_R=block_r, G_PAD=next_pow2(g))
        return out

    @triton.jit
    def _admit_kernel(a_ptr, len_ptr, R, G, K, R_PAD: tl.constexpr, G_PAD: tl.constexpr):
        """One program: sort every (r, j) key, take the K-th as threshold, count per row."""
        rows = tl.arange(0, R_PAD)
        j = tl.arange(0, G_PAD)
        mask = (rows[:, None] < R) & (j[None, :] < G)
        a = tl.load(a_ptr + rows[:, None] * G + j[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        keys = pack_keys(a, j[None, :] * R_PAD + rows[:, None])  # j-major ties, as the twin
        keys = tl.where(mask, keys, -9223372036854775807)
        flat = tl.sort(tl.reshape(keys, [R_PAD * G_PAD]), descending=True)
        pos = tl.arange(0, R_PAD * G_PAD)
        kth = tl.max(tl.where(pos == K - 1, flat, -9223372036854775807), 0)
        take = mask & (keys >= kth) & (K > 0)
        tl.store(len_ptr + rows, tl.sum(take.to(tl.int64), 1), mask=rows < R)

    def admit_topk_triton(survival: torch.Tensor, budget: int | torch.Tensor) -> torch.Tensor:
        r, g = survival.shape
        r_pad, g_pad = next_pow2(r), next_pow2(g)
        if r_pad * g_pad > MAX_ADMIT_ENTRIES:
            raise ValueError(f"admission kernel handles up to {MAX_ADMIT_ENTRIES} (request, position) pairs")
        out = alloc(r, device=survival.device, dtype=torch.int64)
        k = min(max(int(budget), 0), r * g)
        _admit_kernel[(1,)](survival.contiguous(), out, r, g, k, R_PAD=r_pad, G_PAD=g_pad)
        return out
