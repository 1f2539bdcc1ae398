"""Verification of a drafted prefix of any length 0..gamma (DSPARK.md §1.6).

Greedy: accept while the draft equals the target argmax. Sampling: accept x_k with probability
min(1, p_t(x_k) / p_d(x_k)); at the first rejection resample from normalise(max(0, p_t - p_d));
if every verified token passes, the bonus comes from p_t at the next position. Positions beyond
`verify_len` are never looked at, so a shorter verified prefix stays lossless.
"""
from __future__ import annotations

import dataclasses

import torch

from dspark_plugin.sampling import sample


@dataclasses.dataclass
class VerifyResult:
    tokens: torch.Tensor        # [B, g+1]: accepted drafts, then the correction/bonus token; -1 after
    num_accepted: torch.Tensor  # [B]

    @property
    def num_emitted(self) -> torch.Tensor:
        return self.num_accepted + 1

    def emitted(self, row: int) -> list[int]:
        return self.tokens[row, : int(self.num_accepted[row]) + 1].tolist()


def _accepted_prefix(accept: torch.Tensor, verify_len: torch.Tensor) -> torch.Tensor:
    g = accept.shape[1]
    in_prefix = torch.arange(g, device=accept.device)[None, :] < verify_len[:, None]
    return (accept & in_prefix).long().cumprod(dim=1).sum(dim=1)


def _assemble(draft_tokens: torch.Tensor, n: torch.Tensor, last: torch.Tensor) -> VerifyResult:
    b, g = draft_tokens.shape
    j = torch.arange(g + 1, device=draft_tokens.device)[None, :]
    padded = torch.cat([draft_tokens, draft_tokens.new_full((b, 1), -1)], dim=1)
    tokens = torch.where(j < n[:, None], padded, torch.full_like(padded, -1))
    tokens.scatter_(1, n[:, None], last[:, None])
    return VerifyResult(tokens=tokens, num_accepted=n)


def verify_greedy(
    draft_tokens: torch.Tensor, target_logits: torch.Tensor, verify_len: torch.Tensor
) -> VerifyResult:
    """draft_tokens [B, g], target_logits [B, g+1, V] (position j predicts the token after draft j-1)."""
    target = target_logits.argmax(dim=-1)
    n = _accepted_prefix(draft_tokens == target[:, :-1], verify_len.to(draft_tokens.device))
    return _assemble(draft_tokens, n, target.gather(1, n[:, None]).squeeze(1))


def verify_rejection(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    verify_len: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """draft_probs [B, g, V] (what each draft was sampled from), target_probs [B, g+1, V]."""
    b, g = draft_tokens.shape
    verify_len = verify_len.to(draft_tokens.device)
    idx = draft_tokens.clamp(min=0)[..., None]
    p_d = draft_probs.gather(2, idx).squeeze(2)
    p_t = target_probs[:, :g].gather(2, idx).squeeze(2)
    u = torch.rand((b, g), generator=generator, device=draft_tokens.device)
    n = _accepted_prefix(u * p_d < p_t, verify_len)

    rows = torch.arange(b, device=draft_tokens.device)
    pt_n = target_probs[rows, n]                                   # [B, V]
    pd_n = draft_probs[rows, n.clamp(max=g - 1)] if g else torch.zeros_like(pt_n)
    rejected = n < verify_len
    residual = (pt_n - pd_n).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # p_t == p_d leaves no residual mass; rejection then has probability 0, but stay well-defined.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), pt_n)
    final = torch.where(rejected[:, None], residual, pt_n)
    return _assemble(draft_tokens, n, sample(final, generator))
