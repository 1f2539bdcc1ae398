"""Each request's tokens so far, read from Model Runner V1's persistent batch at draft time.

The DSpark proposer runs before the runner's bookkeeping of this step (it drafts from the sampled
tokens on the device, like EAGLE and DFlash), so the batch's `token_ids_cpu[i, :num_tokens_no_spec[i]]`
ends at the previous step. The drafts verified this step sit right after it (`spec_token_ids[i]`,
written there when the step was scheduled); the first `len - rejected` of them were accepted, and
`next_token_ids[i]` (the correction or bonus token) follows them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RowHistory:
    tokens: np.ndarray | None   # [T] the request's tokens up to and including next_token_ids[i]
    verified: int               # drafts verified in this step
    accepted: int               # of which accepted


def row_histories(input_batch: Any, batch: int, next_token_ids: list[int],
                  rejected: list[int] | None, skip: np.ndarray | None = None) -> list[RowHistory]:
    """rejected[i]: drafts of row i rejected this step (None: nothing was verified).
    skip[i]: rows whose sampled token is discarded (a partial prefill): no history."""
    rows = []
    for i in range(batch):
        spec = input_batch.spec_token_ids[i]
        verified = len(spec) if rejected is not None else 0
        accepted = max(0, min(verified, verified - int(rejected[i]))) if verified else 0
        if skip is not None and skip[i]:
            rows.append(RowHistory(None, verified, accepted))
            continue
        done = int(input_batch.num_tokens_no_spec[i])
        tokens = np.concatenate([input_batch.token_ids_cpu[i, :done],
                                 np.asarray(spec[:accepted], dtype=input_batch.token_ids_cpu.dtype),
                                 np.asarray([next_token_ids[i]], dtype=input_batch.token_ids_cpu.dtype)])
        rows.append(RowHistory(tokens, verified, accepted))
    return rows
