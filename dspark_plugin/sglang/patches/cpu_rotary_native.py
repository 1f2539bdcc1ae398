"""Patch `cpu_rotary_native`: rotary embeddings take SGLang's pure-torch path on a CPU-only host.

Replaces: `sglang.srt.layers.rotary_embedding.base._is_cpu` (a module-level bool, set to True), in
every process that builds a model (the scheduler / TP workers; set everywhere the plugin loads).
Scope: every server, on a host without CUDA, where `SGLANG_USE_CPU_ENGINE` is not 1.

Why: SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1`) needs `sgl_kernel`'s CPU build, which PyPI
does not ship (its `sgl_kernel` is CUDA-only and fails to import here). Without it, `is_cpu()` is
False and `RotaryEmbedding.__init__` falls into its "neither CUDA nor CPU nor ..." branch, which
imports `rotary_embedding` from `vllm._custom_ops`: no vLLM in an SGLang environment (and vLLM's
op would be a CUDA op anyway), so building any RoPE model fails. With `_is_cpu` True the rotary
embedding keeps `use_fallback_kernel = False` and dispatches to its native torch forward, which is
exact (greedy ids equal Hugging Face's). `_is_cpu` is read nowhere else in that module except next
to `_is_cpu_amx_available`, which is a separate flag, so nothing else changes.

Upstream form: `patches/sglang-0.5.23-cpu-rotary-native.diff` (the custom-op fallback is taken
only where its kernel exists: CUDA / HIP builds; every other device keeps the native forward).
Delete when the supported SGLang builds RoPE on a CPU host without `SGLANG_USE_CPU_ENGINE`
(`applies()` is then False: the source no longer reaches for `vllm._custom_ops`).
"""
from __future__ import annotations

import logging

logger = logging.getLogger("sglang.dspark_plugin.patches.cpu_rotary_native")

NAME = "cpu_rotary_native"
SCOPE = "every server"
REPLACES = ("sglang.srt.layers.rotary_embedding.base:_is_cpu",)


def applies() -> bool:
    """On a host without CUDA, outside SGLang's CPU engine, while the installed `RotaryEmbedding`
    still falls back to vLLM's custom op for devices it does not list."""
    from dspark_plugin.sglang.patches import cpu_host_outside_cpu_engine

    if not cpu_host_outside_cpu_engine():
        return False
    from sglang.srt.layers.rotary_embedding import base

    from dspark_plugin.patching import source_has

    return not base._is_cpu and source_has(base.RotaryEmbedding.__init__, "vllm._custom_ops")


def install() -> None:
    from sglang.srt.layers.rotary_embedding import base

    from dspark_plugin.patching import replace

    replace(base, "_is_cpu", True, NAME)
    logger.info("dspark-plugin: rotary embeddings use SGLang's native torch path (CPU host without "
                "SGLANG_USE_CPU_ENGINE)")
