"""Pruned draft vocabulary: the drafter scores only the target tokens it will ever plausibly draft.

On a CPU the drafter's per-step cost is dominated by vocabulary-wide work: the LM head over every
drafted position and, per position, the Markov bias W2 . z and the argmax. Keeping the `size`
tokens most frequent in the target's own responses (the training data) cuts that work by V / size.
Lossless either way: greedy drafts are only proposals, and a draft distribution that is zero
outside the subset is still a distribution rejection sampling accepts exactly.

The result is an ordinary DeepSpec checkpoint (`draft_vocab_size` + `d2t` + the drafter's own
`lm_head.weight` rows, EAGLE-3's convention), which vLLM's native reader also loads.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from dspark_plugin.checkpoint.deepspec import load_drafter, save_drafter
from dspark_plugin.errors import DSparkError


def token_counts(data_files: Iterable[str | Path], field: str = "response_ids") -> Counter:
    """Token frequencies over `field` of gen-data JSONL files."""
    counts: Counter = Counter()
    for file in data_files:
        with Path(file).open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ids = json.loads(line)[field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DSparkError(f"{file}:{n}: not a gen-data row with {field!r}") from None
                counts.update(ids)
    return counts


def select_draft_vocab(counts: Counter, size: int, vocab_size: int, keep: Iterable[int] = ()) -> torch.Tensor:
    """The `size` most frequent ids (ties: lower id first), `keep` always in; sorted ascending."""
    keep = sorted({int(t) for t in keep if 0 <= int(t) < vocab_size})
    if not len(keep) <= size <= vocab_size:
        raise DSparkError(f"--size: must be between {len(keep)} (always-kept tokens) and {vocab_size}, got {size}")
    chosen = set(keep)
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= size:
            break
        if 0 <= tok < vocab_size:
            chosen.add(tok)
    for tok in range(vocab_size):  # fewer distinct tokens in the data than `size`: fill by id
        if len(chosen) >= size:
            break
        chosen.add(tok)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def draft_lm_head(target_lm_head: torch.Tensor, ids: torch.Tensor) -> torch.nn.Linear:
    """The draft vocabulary's LM head: the target's rows of those tokens, frozen."""
    lm = torch.nn.Linear(target_lm_head.shape[1], int(ids.numel()), bias=False)
    lm.weight.data.copy_(target_lm_head.detach()[ids])
    lm.requires_grad_(False)
    return lm


def prune_drafter(drafter_dir: str | Path, target_lm_head: torch.Tensor, ids: torch.Tensor,
                  out_dir: str | Path) -> Path:
    """Write a copy of a full-vocabulary drafter restricted to the target ids `ids`."""
    drafter_dir, out_dir = Path(drafter_dir), Path(out_dir)
    drafter = load_drafter(drafter_dir)  # in the dtype it is stored in, which the copy keeps
    cfg = drafter.cfg
    if cfg.pruned_vocab:
        raise DSparkError(f"{drafter_dir / 'config.json'}: draft_vocab_size: the drafter is pruned already")
    if drafter.markov_head is None:
        raise DSparkError(f"{drafter_dir / 'config.json'}: markov_rank: pruning needs a Markov head")
    if tuple(target_lm_head.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise DSparkError(f"target LM head {tuple(target_lm_head.shape)} does not fit the drafter "
                          f"({cfg.vocab_size}, {cfg.hidden_size})")
    cfg.draft_vocab_size = int(ids.numel())
    head = drafter.markov_head
    w2 = head.markov_w2.weight.detach()[ids].clone()
    head.markov_w2 = torch.nn.Linear(w2.shape[1], w2.shape[0], bias=False)
    head.markov_w2.weight.data.copy_(w2)
    drafter.attach_target(None, draft_lm_head(target_lm_head, ids))
    drafter.draft_to_target = ids
    save_drafter(drafter, out_dir, dtype=drafter.dtype)
    for extra in ("dspark_calibration.json", "dspark_sps.json"):  # position-wise, vocabulary-free
        if (drafter_dir / extra).is_file():
            shutil.copy(drafter_dir / extra, out_dir / extra)
    return out_dir

