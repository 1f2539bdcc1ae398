"""`vllm.general_plugins` entry point (name `dspark`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly
more than once per process, so everything here is idempotent and cheap: the drafter class is
registered lazily by qualified name (`drafter_registry.py`: inspected in-process on CPU) and the
patches (`vllm/patches/`, among them `v1_dspark_method`, which lets Model Runner V1 serve DSpark)
install themselves at most once.
Filtering works the usual way: `VLLM_PLUGINS=dspark` (or a list without it to switch it off).
"""
from __future__ import annotations

from vllm.logger import init_logger  # vLLM is the one importing us, so it is importable

from dspark_plugin.vllm.dspark_config import DRAFTER_ARCH
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
    from dspark_plugin.patching import disabled_patches

    installed = install_all()  # engine fixes every server on this build needs, and the DSpark method

    from dspark_plugin.vllm.drafter_registry import register_drafter

    inspected = register_drafter(DRAFTER_ARCH, DRAFTER_CLASS)

    _state["patched"] = installed["v1_dspark_method"]
    if _state["patched"]:
        runner_patch = "installed"
    elif "v1_dspark_method" in disabled_patches(installed):
        runner_patch = "off (DSPARK_DISABLE_PATCHES)"
    else:
        runner_patch = "not needed"
    logger.info("dspark-plugin: registered %s -> %s on %s %s (inspected %s; V1 runner patch %s)",
                DRAFTER_ARCH, DRAFTER_CLASS, build.distribution, build.version, inspected, runner_patch)


def is_active() -> bool:
    """Whether this process registered the drafter and patched the V1 runner (patch `v1_dspark_method`)."""
    return _state["patched"]
