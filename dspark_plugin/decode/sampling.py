"""Logits -> probabilities with temperature / top-k / top-p, shared by drafter and target.

Rejection sampling is lossless for any draft distribution, as long as the token is drawn from
exactly the probabilities handed to the verifier; so both sides go through this one function.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator | None] | None


def logits_to_probs(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """logits [..., V] -> float32 probs [..., V]. Rows with temperature 0 become one-hot argmax."""
    logits = logits.float()
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    while t.dim() < logits.dim():
        t = t.unsqueeze(-1)
    greedy = t <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(t), t)
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = scaled.softmax(-1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy, one_hot, probs)
    return probs


def sample(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """probs [..., V] -> token ids [...].

    `generator` is one generator for all rows, or one per row of a [B, V] `probs` (None: the
    global one), so a seeded request draws from its own stream whatever else is in the batch.
    """
    if generator is None or isinstance(generator, torch.Generator):
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    if probs.dim() != 2 or len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} per-row generators for probs of shape {tuple(probs.shape)}")
    out = torch.multinomial(probs, 1).squeeze(-1)
    for row, gen in enumerate(generator):
        if gen is not None:
            out[row] = torch.multinomial(probs[row], 1, generator=gen)[0]
    return out


def row_seeds(b: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """[B] int64 seeds in [0, 2^32): from each row's own generator where it has one."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, 2**32, (b,), generator=generator, device=gen_device).to(device)
    if len(generator) != b:
        raise ValueError(f"{len(generator)} per-row generators for a batch of {b}")
    seeds = torch.randint(0, 2**32, (b,))
    for row, gen in enumerate(generator):
        if gen is not None:
            seeds[row] = torch.randint(0, 2**32, (1,), generator=gen, device=gen.device)[0].cpu()
    return seeds.to(device)
