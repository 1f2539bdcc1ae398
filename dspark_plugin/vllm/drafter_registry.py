"""The drafter's entry in vLLM's model registry: lazy, and inspected in-process on CPU.

vLLM registers an outside model named as "module:Class" lazily, and the first time a config names
its architecture the API server inspects the class (is it a text-generation model, does it support
pipeline parallelism, ...) in a *subprocess*, so that importing the model cannot initialize CUDA in
a process that forks later (`vllm/model_executor/models/registry.py`, `_LazyRegisteredModel`). The
result is cached under `VLLM_CACHE_ROOT/modelinfos/`, so it costs only the first start on a cache,
but there it costs a fresh Python importing torch and vLLM: 10-12 s of a ~145 s cold start on this
2-core machine (`benchmarks/startup.py`), against ~2 s to import the drafter's module in the API
server, where vLLM is imported already. On CPU there is no CUDA to protect, so this entry inspects
in the calling process; on every other platform it is vLLM's own lazy entry, unchanged. The cache
file is vLLM's (same name, same hash), so the two agree.

Not a patch (no vLLM code is replaced): a subclass of vLLM's lazy entry, put where
`ModelRegistry.register_model` would put the plain one. If the private names move, registration
falls back to the plain "module:Class" string. Remove when vLLM inspects lazily registered models
in-process on platforms without CUDA.
"""
from __future__ import annotations

import logging


def register_drafter(arch: str, qualified_class: str) -> str:
    """Registers `qualified_class` ("module:Class") for `arch`; returns how ("in-process" or "lazy")."""
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    entry = _in_process_entry(qualified_class) if current_platform.is_cpu() else None
    if entry is None:
        ModelRegistry.register_model(arch, qualified_class)
        return "lazy"
    ModelRegistry.models[arch] = entry
    return "in-process"


def _in_process_entry(qualified_class: str):
    try:
        from vllm.model_executor.models.registry import _LazyRegisteredModel, _ModelInfo
    except ImportError:
        return None
    needed = ("_get_modelinfo_module_hash", "_load_modelinfo_from_cache", "_save_modelinfo_to_cache")
    if not all(hasattr(_LazyRegisteredModel, name) for name in needed):
        return None

    class InProcessLazyModel(_LazyRegisteredModel):
        """vLLM's lazy entry whose cache miss imports the class here instead of in a subprocess."""

        def inspect_model_cls(self) -> _ModelInfo:
            import importlib.util
            from pathlib import Path

            spec = importlib.util.find_spec(self.module_name)
            module_hash = None
            if spec is not None and spec.origin:
                module_hash = self._get_modelinfo_module_hash(Path(spec.origin))
                cached = self._load_modelinfo_from_cache(module_hash)
                if cached is not None:
                    return cached
            # vLLM's interface checks warn about its own base class here ("sets `supports_pp=True`,
            # but does not accept `intermediate_tensors`"; a drafter never runs pipeline-parallel);
            # in vLLM's subprocess that line never reached the server log, so it does not here.
            checks = logging.getLogger("vllm.model_executor.models.interfaces")
            level = checks.level
            checks.setLevel(logging.ERROR)
            try:
                info = _ModelInfo.from_model_cls(self.load_model_cls())
            finally:
                checks.setLevel(level)
            if module_hash is not None:
                self._save_modelinfo_to_cache(info, module_hash)
            return info

    module_name, class_name = qualified_class.split(":")
    return InProcessLazyModel(module_name, class_name)
