"""vLLM's native `dflash` drafter layout, the config side: read its config.json, and build one.

The checkpoint writer (trainer `--layout dflash`) is `dspark_plugin.checkpoint.native_dflash`.

vLLM 0.32 serves `{"method": "dflash"}` with `DFlashQwen3ForCausalLM` (architecture
`DFlashDraftModel`). What it reads, and why this package writes exactly that:

- Geometry. Per request the proposer queries `1 + K` slots: the bonus token x_p (the token the
  target just emitted) at position p, then K mask tokens at p+1..p+K; context K/V are the tapped
  target states strictly before p. Only the mask slots are sampled, and the slot at p+j drafts
  the token *at* p+j. That is this package's `sample_from_anchor: false` geometry with
  `block_size = 1 + K`, so a native drafter is K = block_size - 1 drafts per step (vLLM wants
  `num_speculative_tokens: K` given explicitly; it does not read `block_size`).
- Config. A Qwen3 decoder config with `mask_token_id` and `target_layer_ids` inside
  `dflash_config` (the V1 runner reads the tapped layers only from there, +1 as for DeepSpec
  ids: id l is the output of target layer l).
- Tensors. The same names as a DeepSpec DFlash-style drafter (`layers.i.self_attn.q_proj.weight`,
  `fc.weight`, `hidden_norm.weight`, `norm.weight`, ...; vLLM prefixes `model.`). A checkpoint
  without `embed_tokens` / `lm_head` gets the target's shared at load time (vLLM's
  `_maybe_share_embeddings` / `_maybe_share_lm_head`), so neither is stored: the drafter stays
  at its own size (SmolLM2-135M: ~18 MiB in bf16 instead of ~+108 MiB for two vocab matrices).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dspark_plugin.config.geometry import drafts_per_block
from dspark_plugin.errors import DSparkConfigError

if TYPE_CHECKING:  # drafter_config reads this module's forms; the config type is only annotated here
    from dspark_plugin.config.drafter_config import DSparkConfig

ARCH = "DFlashDraftModel"
# dflash_config keys this package understands; any other (sliding windows, causal layers, sink
# biases, value scales) changes the attention vLLM runs, which the trainer does not model.
_KNOWN_DFLASH_KEYS = ("mask_token_id", "target_layer_ids", "use_aux_hidden_state")


def is_native_dflash(raw: dict[str, Any]) -> bool:
    return "dflash_config" in raw or ARCH in (raw.get("architectures") or [])


def num_speculative_tokens(block_size: int) -> int:
    """K for `{"method": "dflash", "num_speculative_tokens": K}`: the mask slots of the block."""
    return drafts_per_block(block_size, sample_from_anchor=False)


def flatten_native(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A native dflash config.json -> the flat DeepSpec form `DSparkConfig` parses."""
    dcfg = raw.get("dflash_config")
    if not isinstance(dcfg, dict):
        raise DSparkConfigError(source, "dflash_config", "missing or not an object")
    unknown = sorted(set(dcfg) - set(_KNOWN_DFLASH_KEYS))
    if unknown:
        raise DSparkConfigError(source, f"dflash_config.{unknown[0]}",
                                "not supported by this package's DFlash reader (plain non-causal full attention only)")
    if dcfg.get("use_aux_hidden_state", True) is not True:
        raise DSparkConfigError(source, "dflash_config.use_aux_hidden_state", "only true (fc over tapped layers)")
    for key in ("mask_token_id", "target_layer_ids"):
        if key not in dcfg:
            raise DSparkConfigError(source, f"dflash_config.{key}", "required key is missing")
    if raw.get("is_causal") or any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise DSparkConfigError(source, "layer_types", "only non-causal full attention is supported")
    flat = {k: v for k, v in raw.items()
            if k not in ("dflash_config", "architectures", "layer_types", "auto_map", "dtype", "torch_dtype")}
    flat.update(mask_token_id=dcfg["mask_token_id"], target_layer_ids=dcfg["target_layer_ids"],
                markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False,
                sample_from_anchor=False)
    return flat


def native_config(cfg: "DSparkConfig", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """config.json for vLLM's native dflash reader; refuses what that reader cannot represent."""
    if not cfg.is_dflash_style:
        raise DSparkConfigError(cfg.source, "markov_rank", "vLLM's native dflash drafter has no Markov or "
                                "confidence head; only a DFlash-style drafter (--head none) can be written")
    if cfg.sample_from_anchor:
        raise DSparkConfigError(cfg.source, "sample_from_anchor", "native dflash drafts from the mask slots "
                                "only: the drafter must be trained with sample_from_anchor false (--layout dflash)")
    if cfg.block_size < 2:
        raise DSparkConfigError(cfg.source, "block_size", "native dflash needs >= 2 (bonus token + masks)")
    # Keys of the DeepSpec form that mean nothing (or something else) to vLLM's dflash reader.
    dropped = ("markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov",
               "sample_from_anchor", "mask_token_id", "target_layer_ids")
    out = {k: v for k, v in cfg.to_dict().items() if k not in dropped}
    out.update(
        architectures=[ARCH],
        model_type="qwen3",
        dflash_config={"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)},
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",
        use_sliding_window=False,
    )
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out
