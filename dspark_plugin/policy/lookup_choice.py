"""Per request: the drafter's block or the context lookup's copy, whichever should survive longer.

The drafter's confidence head gives c_k for its own drafts; a copy gets c_k from what copies of the
same suffix length have done in this server so far (conditional acceptance per position, from a
prior). The expected accepted prefix of a draft is sum_k prod_{i<=k} c_i (docs/algorithm.md §1.5); the
row keeps the draft with the larger one.

Exactness (docs/algorithm.md §1.7): a greedy row may be chosen from anything, since greedy
verification emits the target's argmax whatever was drafted. A sampled row must not be chosen from
its own sampled drafts: c_k depends on x_{k-1}, and keeping the drafter's block only when its drafts
look good would bias them away from the distribution they were drawn from. There the drafter's side
of the comparison is its running mean over earlier steps, known before this block was drawn; the
copy's is fixed by the history. The choice then depends on nothing the verifier draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dspark_plugin.decode.context_lookup import MAX_NGRAM, MIN_NGRAM, Lookup

PRIOR_ACCEPT = 0.7    # vLLM ngram's first draft was accepted 0.60-0.72 of the time on our prompt sets
PRIOR_WEIGHT = 8.0    # worth this many observed verifications per position
MAX_COUNT = 4096.0    # counts are halved past this: a long-running server follows its traffic
DRAFTER_MEAN_DECAY = 0.99  # running mean of the drafter's expected prefix, over rows of past steps


class LookupAcceptance:
    """Conditional acceptance of copied drafts: P(copy k accepted | copies 1..k-1 accepted), per
    matched suffix length, learned from verifications."""

    def __init__(self, block: int, max_ngram: int = MAX_NGRAM):
        self.block = block
        self.reached = np.full((max_ngram + 1, block), PRIOR_WEIGHT)
        self.accepted = np.full((max_ngram + 1, block), PRIOR_WEIGHT * PRIOR_ACCEPT)
        self.drafter_mean = 0.0  # the drafter's expected accepted prefix, earlier steps only

    def note_drafter(self, expected: list[float]) -> None:
        """This step's drafter blocks, for the comparisons of later steps (never this one's)."""
        for value in expected:
            self.drafter_mean = DRAFTER_MEAN_DECAY * self.drafter_mean + (1 - DRAFTER_MEAN_DECAY) * value

    def confidence(self, ngram: int, length: int) -> np.ndarray:
        """c_1..c_length of a copy that matched `ngram` tokens."""
        return self.accepted[ngram, :length] / self.reached[ngram, :length]

    def summary(self) -> str:
        """First-copy acceptance per suffix length, with its verification count (prior included)."""
        return ", ".join(f"{n}-token suffix: c1 {self.accepted[n, 0] / self.reached[n, 0]:.2f} of "
                         f"{self.reached[n, 0] - PRIOR_WEIGHT:.0f}" for n in range(MIN_NGRAM, self.reached.shape[0]))

    def observe_copy(self, copied: tuple[int, int], verified: int, accepted: int) -> None:
        """A step that verified `verified` drafts of a row whose first copy[1] were the copy
        `copied` = (suffix length, copy length), and accepted `accepted`: only the copy's part counts."""
        ngram, length = copied
        verified = min(verified, length)
        self.observe(ngram, verified, min(accepted, verified))

    def observe(self, ngram: int, verified: int, accepted: int) -> None:
        """A copy of which `verified` tokens were checked and the first `accepted` kept."""
        verified = max(0, min(verified, self.block))
        accepted = max(0, min(accepted, verified))
        reached = min(accepted + 1, verified)  # positions whose predecessors were all accepted
        self.reached[ngram, :reached] += 1.0
        self.accepted[ngram, :accepted] += 1.0
        if self.reached[ngram, 0] > MAX_COUNT:
            self.reached[ngram] /= 2.0
            self.accepted[ngram] /= 2.0


@dataclass
class ChosenDrafts:
    tokens: torch.Tensor               # [B, g]
    confidence: torch.Tensor | None    # [B, g]; a copied row is 0 past its copy (not worth verifying)
    probs: torch.Tensor | None         # [B, g, V]; a copied token's draft distribution is one-hot
    copied: list[tuple[int, int] | None]  # per row: (matched suffix length, copy length), or None


def expected_accepted(confidence: torch.Tensor) -> torch.Tensor:
    """[..., g] conditional confidences -> expected accepted prefix length sum_k prod_{i<=k} c_i."""
    return confidence.double().cumprod(dim=-1).sum(dim=-1)


def choose_drafts(tokens: torch.Tensor, confidence: torch.Tensor | None, probs: torch.Tensor | None,
                  lookups: list[Lookup | None], acceptance: LookupAcceptance,
                  sampled: list[bool] | None = None) -> ChosenDrafts:
    """Replace each row's drafts with its copy where the copy's expected accepted prefix is longer
    (a drafter without a confidence head: wherever there is a copy). sampled[b]: row b was drawn
    at temperature > 0, so its own drafts may not take part in the choice (module docstring)."""
    copied: list[tuple[int, int] | None] = [None] * tokens.shape[0]
    g = tokens.shape[1]
    expected = expected_accepted(confidence).tolist() if confidence is not None else None
    rows = [b for b, found in enumerate(lookups) if found is not None]
    if not rows:
        if expected is not None:
            acceptance.note_drafter(expected)
        return ChosenDrafts(tokens, confidence, probs, copied)
    earlier = acceptance.drafter_mean
    ours = [0.0 if expected is None else earlier if sampled is not None and sampled[b] else expected[b]
            for b in rows]
    if expected is not None:
        acceptance.note_drafter(expected)
    tokens = tokens.clone()
    confidence = confidence.clone() if confidence is not None else None
    probs = probs.clone() if probs is not None else None
    for b, drafter_expects in zip(rows, ours):
        found = lookups[b]
        n = min(len(found.tokens), g)
        conf = acceptance.confidence(found.ngram, n)
        if float(np.cumprod(conf).sum()) <= drafter_expects:
            continue
        copy = torch.as_tensor(found.tokens[:n], dtype=tokens.dtype, device=tokens.device)
        tokens[b, :n] = copy
        if confidence is not None:
            confidence[b, :n] = torch.as_tensor(conf, dtype=confidence.dtype, device=confidence.device)
            confidence[b, n:] = 0.0
        if probs is not None:
            probs[b, :n] = 0.0
            probs[b, torch.arange(n, device=probs.device), copy] = 1.0
        copied[b] = (found.ngram, n)
    return ChosenDrafts(tokens, confidence, probs, copied)
