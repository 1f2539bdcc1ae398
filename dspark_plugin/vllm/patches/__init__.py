"""The plugin's monkey-patches of vLLM, one file each, and the index that installs them.

Each file says what it replaces and in which process, why, the upstream diff in `patches/` that
makes it unnecessary, and when to delete it; `applies()` checks the installed source still has the
shape (or the bug) the patch was written against, so a fixed vLLM is left alone; `install()` goes
through `_guard.replace`, which refuses to patch one attribute twice. `DSPARK_DISABLE_PATCHES=a,b`
switches patches off by name; the server logs which are active.

| name             | replaces                                        | process | scope        |
|------------------|-------------------------------------------------|---------|--------------|
| aot_cache_load   | compilation.decorators._try_load_aot_compiled_fn| workers | every server |

(The DSpark runner patches still live in `dspark_plugin/vllm/patch_v1.py`.)
"""
from __future__ import annotations

import importlib

from vllm.logger import init_logger

from dspark_plugin.vllm.patches._guard import disabled_patches

logger = init_logger("vllm.dspark_plugin.patches")

INDEX: tuple[str, ...] = ("aot_cache_load",)
_installed: dict[str, bool] = {}


def install_all() -> dict[str, bool]:
    """Install every patch that applies and is not switched off, once per process: name -> active."""
    if _installed:
        return dict(_installed)
    off = disabled_patches(INDEX)
    for name in INDEX:
        module = importlib.import_module(f"dspark_plugin.vllm.patches.{name}")
        active = name not in off and module.applies()
        if active:
            module.install()
        _installed[name] = active
    logger.info("dspark-plugin patches: %s", ", ".join(
        f"{n} {'on' if a else ('off (DSPARK_DISABLE_PATCHES)' if n in off else 'not needed')}"
        for n, a in _installed.items()))
    return dict(_installed)
