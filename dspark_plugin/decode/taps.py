"""Which target layers the drafter reads, and how their outputs are gathered."""
from __future__ import annotations

from typing import Sequence

import torch


def tap_layer_ids(num_target_layers: int, n: int = 5) -> list[int]:
    """`round(1 + i*(L-4)/(n-1))`: spread over the network, never the last layer (docs/algorithm.md §2)."""
    if n < 1:
        raise ValueError(f"need at least one tapped layer, got n={n}")
    if num_target_layers < 4:
        # The formula needs L >= 4; for toy targets tap the early layers, still never the last.
        return list(range(min(n, max(num_target_layers - 1, 1))))
    if n == 1:
        return [num_target_layers // 2]
    ids = [int(round(1 + i * (num_target_layers - 4) / (n - 1))) for i in range(n)]
    return sorted(set(ids))


def gather_taps(hidden_states: Sequence[torch.Tensor], layer_ids: Sequence[int]) -> torch.Tensor:
    """Concatenate the raw outputs of decoder layers `layer_ids` (HF `hidden_states[l + 1]`)."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)
