"""Pruned draft vocabulary: draft ids <-> target ids (EAGLE-3 / vLLM `d2t` convention).

A pruned drafter scores only `draft_vocab_size` tokens; `d2t[i]` is the offset of draft id i, so
target id = i + d2t[i]. Drafted tokens go back to target ids (the Markov W1 and the verifier read
target ids) and draft distributions are scattered to the target's vocabulary, zero outside the
subset, which rejection sampling accepts as they are. Choosing the subset: `train/prune_vocab`.
"""
from __future__ import annotations

import torch


def target_ids_from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    """`d2t` offsets [n] -> the target id of each draft id [n] (int64)."""
    return d2t.long() + torch.arange(d2t.numel(), device=d2t.device)


def d2t_from_target_ids(ids: torch.Tensor) -> torch.Tensor:
    """Target id of each draft id [n] -> the `d2t` offsets stored in a checkpoint."""
    return ids.long() - torch.arange(ids.numel(), device=ids.device)


def to_target_vocab(probs: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft-space distributions [..., n] -> the target's vocabulary [..., vocab_size], zero elsewhere."""
    full = probs.new_zeros(*probs.shape[:-1], vocab_size)
    return full.index_copy_(-1, ids, probs)
