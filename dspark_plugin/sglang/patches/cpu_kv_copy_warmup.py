"""Patch `cpu_kv_copy_warmup`: a CPU KV pool moves KV with torch and skips the Triton copy warm-up.

Replaces: `sglang.srt.mem_cache.memory_pool:MHATokenToKVPool._init_kv_copy_and_warmup`, in the
scheduler process (where the pools are built). Scope: every server, on a host without CUDA,
outside SGLang's CPU engine; it acts only on pools whose buffers live on the CPU and only when a
speculative algorithm is configured (SGLang builds the copy kernel then, `kv_cache_configurator`:
`enable_kv_cache_copy=(speculative_algorithm is not None)`), so a plain server never reaches it.

Why: with any speculative algorithm, `MHATokenToKVPool.__init__` sets up the tiled all-layer KV
copy that `move_kv_cache` uses after verification, and warms it up by launching its Triton kernel
once. On CPU there is no Triton driver, so the pool constructor fails and the server dies before it
serves. SGLang has a pure-torch move for exactly this (`SGLANG_NATIVE_MOVE_KV_CACHE=1` makes
`_move_kv_cache_impl` call `move_kv_cache_native`), but the environment variable does not stop the
warm-up. The replacement, for a CPU pool, turns the native move on and leaves the copy kernel
unconfigured; any other pool runs SGLang's method unchanged. (`dspark-sglang` also exports
`SGLANG_NATIVE_MOVE_KV_CACHE=1`, so the choice is visible in the environment.)

Upstream form: `patches/sglang-0.5.23-cpu-kv-copy-warmup.diff` (the pool uses the native move and
skips the Triton warm-up when its device is the CPU, or when `SGLANG_NATIVE_MOVE_KV_CACHE` is set).
Delete when the supported SGLang builds a speculative server's KV pool on CPU without Triton
(`applies()` then finds no unconditional warm-up in the method).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger("sglang.dspark_plugin.patches.cpu_kv_copy_warmup")

NAME = "cpu_kv_copy_warmup"
SCOPE = "every server"
REPLACES = ("sglang.srt.mem_cache.memory_pool:MHATokenToKVPool._init_kv_copy_and_warmup",)


def _make_wrapper(sglang_method: Any) -> Any:
    @functools.wraps(sglang_method)
    def _init_kv_copy_and_warmup(self) -> None:
        if torch.device(self.device).type == "cpu":
            self.use_native_move_kv_cache = True   # move_kv_cache -> move_kv_cache_native (torch)
            self._kv_copy_config = None             # what SGLang's own method sets for a pool with no copy
            return
        sglang_method(self)

    return _init_kv_copy_and_warmup


def applies() -> bool:
    """On a host without CUDA, outside SGLang's CPU engine, while the installed method still warms
    the Triton copy kernel up."""
    from dspark_plugin.sglang.patches import cpu_host_outside_cpu_engine

    if not cpu_host_outside_cpu_engine():
        return False
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from dspark_plugin.patching import source_has

    return source_has(MHATokenToKVPool._init_kv_copy_and_warmup, "copy_all_layer_kv_cache_func(")


def install() -> None:
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from dspark_plugin.patching import replace

    replace(MHATokenToKVPool, "_init_kv_copy_and_warmup", _make_wrapper(MHATokenToKVPool._init_kv_copy_and_warmup),
            NAME)
    logger.info("dspark-plugin: CPU KV pools move KV with torch (SGLANG_NATIVE_MOVE_KV_CACHE) and skip the Triton "
                "copy warm-up")
