"""`sglang.srt.plugins` entry point (name `dspark`).

SGLang calls `register()` through `load_plugins()` in every process it starts that loads plugins
(the launcher, each scheduler, the detokenizer), at most once per process by its own guard, but the
launcher `dspark-sglang` may call it too, so everything here is idempotent and cheap: the CPU patches
(`sglang/patches/`) install themselves at most once and only where they apply (a host without
CUDA), and the speculative algorithm `PLUGIN_DSPARK` (algorithm.py) is registered once; its worker
is imported only when a scheduler builds it. Filtering works the usual way: `SGLANG_PLUGINS=dspark`
(or a list without it to switch the plugin off).

Logging goes to the `sglang.` hierarchy, which SGLang's `configure_logger` sets up in its processes.
"""
from __future__ import annotations

import logging

from dspark_plugin.sglang.versions import installed_sglang, policy_message

logger = logging.getLogger("sglang.dspark_plugin.plugin")

_state: dict[str, object] = {"registered": False, "patches": {}, "algorithm": False}


def register() -> None:
    """Install the CPU patches that apply and register PLUGIN_DSPARK; once per process."""
    if _state["registered"]:
        return
    _state["registered"] = True
    build = installed_sglang()
    message = policy_message(build)
    if message is not None:
        logger.warning(message)
        return

    from dspark_plugin.sglang.algorithm import ALGORITHM_NAME, register_algorithm
    from dspark_plugin.sglang.patches import install_all

    _state["patches"] = install_all()
    register_algorithm()
    _state["algorithm"] = True
    logger.info("dspark-plugin: registered speculative algorithm %s on sglang %s", ALGORITHM_NAME, build.version)


def is_active() -> bool:
    """Whether this process registered PLUGIN_DSPARK (False on an unsupported SGLang)."""
    return bool(_state["algorithm"])


def installed_patches() -> dict[str, bool]:
    """name -> active, as `register()` installed them in this process (empty before it ran)."""
    return dict(_state["patches"])  # type: ignore[arg-type]
