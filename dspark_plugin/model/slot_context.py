"""The drafter's context K/V addressed by an engine's KV-cache slots.

`ContextCache` (drafter.py) keeps each request's context in its own padded rows: right for the
reference runner, wrong for a serving engine, which owns the memory and shares a prompt's slots
between requests (a prefix-cache hit). Here the drafter's context K/V of a position lives at the
same slot index as the target's K/V of that position, in one tensor per drafter layer sized like
the engine's pool: a request's context is the slots its block table (SGLang: `req_to_token`) lists
for its committed positions, so a cached prefix brings the drafter's context with it, written when
the prefix was first computed, and a freed slot is simply overwritten by its next owner.

`gather(rows)` returns the object `DSparkDrafter.block_hidden` reads (its `view()`: per-layer K/V
[B, H, L, Dh], padded to the longest row, and the valid mask), so drafting is the core's, batched
over the requests.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


class GatheredContext(NamedTuple):
    kv: KV                          # per layer (k, v) [B, H, L, Dh]
    valid: torch.Tensor | None      # [B, L]; None when every row has L positions

    def view(self) -> tuple[KV, torch.Tensor | None]:
        return self.kv, self.valid


class SlotContext:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]

    def write(self, kv: KV, slots: torch.Tensor) -> None:
        """kv[layer] = (k, v) [1, H, N, Dh] of N positions (any requests, in any order) -> their slots [N]."""
        slots = slots.to(self.k[0].device, torch.int64)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_slots):
            raise IndexError(f"drafter context: slot ids {int(slots.min())}..{int(slots.max())} outside the "
                             f"pool of {self.num_slots}")
        for kb, vb, (k, v) in zip(self.k, self.v, kv):
            kb[slots] = k[0].transpose(0, 1).to(kb.dtype)   # [N, H, Dh]
            vb[slots] = v[0].transpose(0, 1).to(vb.dtype)

    def gather(self, rows: list[torch.Tensor]) -> GatheredContext:
        """Each request's context: the slots of its committed positions, in position order -> K/V
        [B, H, L, Dh] padded to the longest (padding masked out, slot 0's contents)."""
        lengths = [int(r.numel()) for r in rows]
        longest = max(lengths)
        index = torch.zeros(len(rows), longest, dtype=torch.int64)
        for i, r in enumerate(rows):
            index[i, :lengths[i]] = r.to(torch.int64).cpu()
        index = index.to(self.k[0].device)
        kv = [(kb[index].permute(0, 2, 1, 3), vb[index].permute(0, 2, 1, 3)) for kb, vb in zip(self.k, self.v)]
        if all(n == longest for n in lengths):
            return GatheredContext(kv, None)
        valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        return GatheredContext(kv, valid.to(self.k[0].device))
