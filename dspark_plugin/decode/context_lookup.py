"""Context lookup: drafts copied from the request's own tokens (prompt lookup, as vLLM's `ngram`).

Small targets fall into repetition, and code and answers quote their prompt; there the tokens that
followed the last occurrence of the current suffix are the best draft there is, and a one-layer
drafter that never sees the raw token history cannot copy them. The proposer offers both and keeps,
per request, the one with the longer expected accepted prefix (`policy/lookup_choice.py`).
Verification decides as for any draft, so output stays exact (docs/algorithm.md §1.7, §1.8).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_NGRAM, MAX_NGRAM = 2, 4  # suffix lengths tried, longest first (vLLM's ngram defaults are 2..4 too)


@dataclass(frozen=True)
class Lookup:
    tokens: np.ndarray   # [L] the tokens that followed the match, 1 <= L <= k
    ngram: int           # length of the suffix that matched


def find_continuation(history: np.ndarray | list[int], k: int, min_ngram: int = MIN_NGRAM,
                      max_ngram: int = MAX_NGRAM) -> Lookup | None:
    """The longest suffix of `history` (max_ngram down to min_ngram tokens) that occurs earlier in it
    -> up to k tokens that followed that occurrence, or None.

    Of several occurrences the latest with k tokens after it wins (a loop's previous turn), else the
    latest (copying the most recent text); the suffix itself is never its own match.
    """
    h = np.asarray(history)
    size = h.shape[0]
    if k <= 0 or size < min_ngram + 1:
        return None
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = h[size - n:]
        # windows[j] = h[j : j + n] for j + n <= size - 1: every earlier occurrence with a token after it
        windows = np.lib.stride_tricks.sliding_window_view(h[:size - 1], n)
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if starts.size == 0:
            continue
        ends = starts + n                                  # first continuation token
        full = ends[size - ends >= k]
        end = int(full[-1] if full.size else ends[-1])
        return Lookup(tokens=h[end:end + k].copy(), ngram=n)
    return None
