"""The plugin's monkey-patches of SGLang, one file each, and the index that installs them.

They make plain SGLang 0.5.23 serve on a CPU-only host with PyPI's wheels (whose `sgl_kernel` is a
CUDA build, so SGLang's own CPU engine, `SGLANG_USE_CPU_ENGINE=1`, is not available), and let an
outside speculative algorithm run there. Each file says what it replaces and in which process, why,
the upstream diff in `patches/` that makes it unnecessary, when to delete it, and its scope;
`applies()` checks the host (no CUDA, no CPU engine) and that the installed source still has the
shape it was written against, so a CUDA server or a fixed SGLang is left alone; `install()` goes
through `dspark_plugin.patching.replace`, which refuses to patch one attribute twice. `DSPARK_DISABLE_PATCHES=a,b`
switches patches off by name; the server logs one line saying which are on, off or not needed.
`plugin.register()` calls `install_all()` in every process SGLang loads plugins in.

| name                         | replaces (under `sglang.srt.`)                            | process   | scope        |
|------------------------------|-----------------------------------------------------------|-----------|--------------|
| cpu_rotary_native            | layers.rotary_embedding.base._is_cpu                      | scheduler | every server |
| cpu_assign_req_to_token_pool | mem_cache.allocation.assign_req_to_token_pool_func,       | scheduler | every server |
|                              | speculative.spec_utils.assign_req_to_token_pool_func      |           | (spec only)  |
| cpu_kv_copy_warmup           | mem_cache.memory_pool.MHATokenToKVPool                    | scheduler | every server |
|                              | ._init_kv_copy_and_warmup                                 |           | (spec only)  |
| cpu_extend_attention         | layers.attention.torch_native_backend                     | scheduler | every server |
|                              | .TorchNativeAttnBackend._run_sdpa_forward_extend          |           |              |

("spec only": installed in every server like the others, but only speculative decoding reaches the
replaced code, so a plain server runs exactly SGLang's code there.) The patches are installed in
every process that loads plugins (launcher, tokenizer manager, scheduler, detokenizer): only the
scheduler builds models and pools, and installing everywhere keeps registration free of process
detection; each costs one attribute write.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

from dspark_plugin.patching import disabled_patches

logger = logging.getLogger("sglang.dspark_plugin.patches")

INDEX: tuple[str, ...] = ("cpu_rotary_native", "cpu_assign_req_to_token_pool", "cpu_kv_copy_warmup",
                          "cpu_extend_attention")
_installed: dict[str, bool] = {}


def cpu_host_outside_cpu_engine() -> bool:
    """Where every patch here is meant for: no CUDA, and not SGLang's own CPU engine
    (`SGLANG_USE_CPU_ENGINE=1`, which brings its own CPU kernels)."""
    import os

    import torch

    return not torch.cuda.is_available() and os.environ.get("SGLANG_USE_CPU_ENGINE", "0") != "1"


def module(name: str) -> Any:
    """The module of patch `name` (one of INDEX)."""
    return importlib.import_module(f"dspark_plugin.sglang.patches.{name}")


def install_all() -> dict[str, bool]:
    """Install every patch that applies and is not switched off, once per process: name -> active."""
    if _installed:
        return dict(_installed)
    off = disabled_patches(INDEX)
    for name in INDEX:
        patch = module(name)
        active = name not in off and patch.applies()
        if active:
            patch.install()
        _installed[name] = active
    logger.info("dspark-plugin patches: %s", ", ".join(
        f"{n} {'on' if a else 'off (DSPARK_DISABLE_PATCHES)' if n in off else 'not needed'}"
        for n, a in _installed.items()))
    return dict(_installed)
