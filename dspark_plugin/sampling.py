"""Logits -> probabilities with temperature / top-k / top-p, shared by drafter and target.

Rejection sampling is lossless for any draft distribution, as long as the token is drawn from
exactly the probabilities handed to the verifier; so both sides go through this one function.
"""
from __future__ import annotations

import torch


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


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs [..., V] -> token ids [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
