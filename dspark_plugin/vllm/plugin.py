"""`vllm.general_plugins` entry point (name `dspark`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly
more than once per process, so everything here is idempotent and cheap: the drafter class is
registered lazily by qualified name and the runner patch installs itself at most once.
Filtering works the usual way: `VLLM_PLUGINS=dspark` (or a list without it to switch it off).
"""
from __future__ import annotations

from vllm.logger import init_logger  # vLLM is the one importing us, so it is importable

from dspark_plugin.vllm.patch_v1 import DRAFTER_ARCH
from dspark_plugin.vllm.versions import installed_vllm, policy_message

# Under "vllm.": vLLM configures handlers for its own loggers only (see proposer.py).
logger = init_logger("vllm.dspark_plugin.plugin")

# The class that serves DRAFTER_ARCH (the architecture every DeepSpec drafter declares): a subclass
# of vLLM's own reader that adds the gated and rnn sequential heads.
DRAFTER_CLASS = "dspark_plugin.vllm.model:DSparkQwen3ForCausalLM"

_state = {"registered": False, "patched": False}


def register() -> None:
    if _state["registered"]:
        return
    _state["registered"] = True
    build = installed_vllm()
    message = policy_message(build)
    if message is not None:
        logger.warning(message)
        return

    from dspark_plugin.vllm.patches import install_all

    install_all()  # engine fixes every server on this build needs, DSpark or not

    from vllm import ModelRegistry

    ModelRegistry.register_model(DRAFTER_ARCH, DRAFTER_CLASS)

    from dspark_plugin.vllm import patch_v1

    _state["patched"] = patch_v1.apply(build)
    logger.info("dspark-plugin: registered %s -> %s on %s %s (V1 runner patch %s)",
                DRAFTER_ARCH, DRAFTER_CLASS, build.distribution, build.version,
                "installed" if _state["patched"] else "not needed")


def is_active() -> bool:
    """Whether this process registered the drafter and patched the V1 runner."""
    return _state["patched"]
