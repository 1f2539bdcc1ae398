"""Drafter configuration: the DeepSpec `config.json` (native or speculators form), validated.

Native form: the target's config plus `architectures: ["Qwen3DSparkModel"]`, `block_size`,
`mask_token_id`, `target_layer_ids`, `markov_rank`, `markov_head_type`, `enable_confidence_head`,
`confidence_head_with_markov`. Speculators form: `speculators_model_type: "dspark"` with the
decoder fields under `transformer_layer_config` and the DSpark fields at the top level (or under
`speculators_config`). `markov_rank: 0` without a confidence head is a DFlash-style drafter.
vLLM's native `dflash` form (`DFlashDraftModel`, see `dflash_native`) is read as a DFlash-style
drafter with `sample_from_anchor: false` (bonus token + masks, drafts from the masks).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dspark_plugin.config.dflash_native import flatten_native, is_native_dflash
from dspark_plugin.config.geometry import drafts_per_block
from dspark_plugin.errors import DSparkConfigError

HEAD_TYPES = ("vanilla", "gated", "rnn")
CONFIG_NAME = "config.json"

# Keys this class owns; everything else in config.json is kept verbatim in `extra`.
_DECODER_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "vocab_size",
    "max_position_embeddings",
)


@dataclasses.dataclass
class DSparkConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = True
    sample_from_anchor: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    target_hidden_size: int | None = None
    draft_vocab_size: int | None = None   # < vocab_size: a pruned draft vocabulary (d2t tensor)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "<config>"

    # -- derived ---------------------------------------------------------------------------
    @property
    def has_markov(self) -> bool:
        return self.markov_rank > 0

    @property
    def is_dflash_style(self) -> bool:
        return not self.has_markov and not self.enable_confidence_head

    @property
    def draft_vocab(self) -> int:
        """Rows of the drafter's LM head and Markov W2: the target's vocabulary unless pruned."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def pruned_vocab(self) -> bool:
        return self.draft_vocab < self.vocab_size

    @property
    def num_drafts(self) -> int:
        """gamma: anchor-first blocks predict from every slot, DFlash layout from the masks only."""
        return drafts_per_block(self.block_size, self.sample_from_anchor)

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)

    @property
    def tapped_hidden_size(self) -> int:
        return self.target_hidden_size or self.hidden_size

    # -- I/O ---------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "DSparkConfig":
        path = Path(path)
        if not path.exists():
            raise DSparkConfigError(path, "<directory>", "drafter directory does not exist")
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise DSparkConfigError(file, "<file>", "config.json not found in the drafter directory")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise DSparkConfigError(file, "<json>", f"not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise DSparkConfigError(file, "<json>", "top level must be an object")
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> "DSparkConfig":
        if "speculators_model_type" in raw:
            flat = _flatten_speculators(raw, source)
        elif is_native_dflash(raw):  # vLLM's own dflash layout: read as a DFlash-geometry drafter
            flat = flatten_native(raw, source)
        else:
            flat = dict(raw)
        return _parse(flat, source)

    def to_dict(self) -> dict[str, Any]:
        """The native DeepSpec form (what vLLM's and SGLang's readers expect)."""
        out = dict(self.extra)
        out.update({k: getattr(self, k) for k in _DECODER_KEYS})
        out.update(
            architectures=["Qwen3DSparkModel"],
            model_type=out.get("model_type", "qwen3"),
            block_size=self.block_size,
            mask_token_id=self.mask_token_id,
            target_layer_ids=list(self.target_layer_ids),
            num_target_layers=self.num_target_layers,
            markov_rank=self.markov_rank,
            markov_head_type=self.markov_head_type,
            enable_confidence_head=self.enable_confidence_head,
            confidence_head_with_markov=self.confidence_head_with_markov,
            sample_from_anchor=self.sample_from_anchor,
            tie_word_embeddings=False,
            attention_bias=False,
        )
        out.pop("rope_parameters", None)  # rope_theta above is the single source of truth
        if self.target_hidden_size is not None:
            out["target_hidden_size"] = self.target_hidden_size
        if self.pruned_vocab:
            out["draft_vocab_size"] = self.draft_vocab_size
        else:
            out.pop("draft_vocab_size", None)
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _flatten_speculators(raw: dict[str, Any], source: str) -> dict[str, Any]:
    kind = raw.get("speculators_model_type")
    if kind != "dspark":
        raise DSparkConfigError(source, "speculators_model_type", f"expected 'dspark', got {kind!r}")
    layer_cfg = raw.get("transformer_layer_config")
    if not isinstance(layer_cfg, dict):
        raise DSparkConfigError(source, "transformer_layer_config", "missing or not an object")
    flat = dict(layer_cfg)
    spec = raw.get("speculators_config") or {}
    for part in (spec, raw):  # top-level keys win over nested ones
        flat.update({k: v for k, v in part.items()
                     if k not in ("transformer_layer_config", "speculators_config", "proposal_methods",
                                  "verifier", "speculators_model_type", "architectures")})
    if "block_size" not in flat:
        methods = spec.get("proposal_methods") or []
        if methods and isinstance(methods[0], dict) and "speculative_tokens" in methods[0]:
            flat["block_size"] = methods[0]["speculative_tokens"]
    if "target_layer_ids" not in flat and "aux_hidden_state_layer_ids" in flat:
        flat["target_layer_ids"] = flat.pop("aux_hidden_state_layer_ids")
    flat["_speculators_form"] = True
    return flat


def _need(raw: dict[str, Any], key: str, source: str) -> Any:
    if key not in raw or raw[key] is None:
        raise DSparkConfigError(source, key, "required key is missing")
    return raw[key]


def _int(raw: dict[str, Any], key: str, source: str, default: Any = None, minimum: int | None = None) -> int:
    value = raw.get(key, default) if default is not None else _need(raw, key, source)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DSparkConfigError(source, key, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise DSparkConfigError(source, key, f"must be >= {minimum}, got {value}")
    return value


def _bool(raw: dict[str, Any], key: str, source: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise DSparkConfigError(source, key, f"must be true or false, got {value!r}")
    return value


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise DSparkConfigError(source, "rope_parameters", "must be an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise DSparkConfigError(source, "rope_parameters.rope_type",
                                f"only default RoPE is supported by the drafter, got {kind!r}")
    theta = raw.get("rope_theta", params.get("rope_theta", 1_000_000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise DSparkConfigError(source, "rope_theta", f"must be a positive number, got {theta!r}")
    return float(theta)


def _parse(raw: dict[str, Any], source: str) -> DSparkConfig:
    hidden = _int(raw, "hidden_size", source, minimum=1)
    heads = _int(raw, "num_attention_heads", source, minimum=1)
    kv_heads = _int(raw, "num_key_value_heads", source, default=heads, minimum=1)
    if heads % kv_heads:
        raise DSparkConfigError(source, "num_key_value_heads",
                                f"{kv_heads} does not divide num_attention_heads={heads}")
    head_dim = _int(raw, "head_dim", source, default=hidden // heads, minimum=1)
    block_size = _int(raw, "block_size", source, minimum=1)
    rank = _int(raw, "markov_rank", source, default=0, minimum=0)
    head_type = raw.get("markov_head_type", "vanilla")
    if not isinstance(head_type, str) or head_type.lower() not in HEAD_TYPES:
        raise DSparkConfigError(source, "markov_head_type",
                                f"must be one of {', '.join(HEAD_TYPES)}; got {head_type!r}")
    confidence = _bool(raw, "enable_confidence_head", source, default=False)
    with_markov = _bool(raw, "confidence_head_with_markov", source, default=rank > 0)
    if confidence and with_markov and rank == 0:
        raise DSparkConfigError(source, "confidence_head_with_markov",
                                "needs markov_rank > 0 (the confidence head reads W1[x_prev])")
    layer_ids = _need(raw, "target_layer_ids", source)
    if (not isinstance(layer_ids, list) or not layer_ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layer_ids)):
        raise DSparkConfigError(source, "target_layer_ids",
                                f"must be a non-empty list of non-negative integers, got {layer_ids!r}")
    num_target_layers = _int(raw, "num_target_layers", source, default=max(layer_ids) + 2, minimum=1)
    if max(layer_ids) >= num_target_layers:
        raise DSparkConfigError(source, "target_layer_ids",
                                f"layer {max(layer_ids)} is out of range for num_target_layers={num_target_layers}")
    vocab = _int(raw, "vocab_size", source, minimum=1)
    mask_id = _int(raw, "mask_token_id", source, minimum=0)
    if mask_id >= vocab:
        raise DSparkConfigError(source, "mask_token_id", f"{mask_id} is outside vocab_size={vocab}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise DSparkConfigError(source, "hidden_act", f"only 'silu' is supported, got {act!r}")
    draft_vocab = raw.get("draft_vocab_size")
    if draft_vocab is not None:
        draft_vocab = _int(raw, "draft_vocab_size", source, minimum=1)
        if draft_vocab > vocab:
            raise DSparkConfigError(source, "draft_vocab_size", f"{draft_vocab} exceeds vocab_size={vocab}")
        if draft_vocab == vocab:
            draft_vocab = None
        elif rank == 0:
            raise DSparkConfigError(source, "draft_vocab_size",
                                    "a pruned draft vocabulary needs a Markov head (markov_rank > 0)")
    target_hidden = raw.get("target_hidden_size")
    if target_hidden is not None:
        target_hidden = _int(raw, "target_hidden_size", source, minimum=1)
    eps = raw.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise DSparkConfigError(source, "rms_norm_eps", f"must be a positive number, got {eps!r}")

    owned = set(_DECODER_KEYS) | {f.name for f in dataclasses.fields(DSparkConfig)} | {
        "rope_parameters", "rope_scaling", "architectures", "tie_word_embeddings", "attention_bias"}
    extra = {k: v for k, v in raw.items() if k not in owned and not k.startswith("_")}
    return DSparkConfig(
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size", source, minimum=1),
        num_hidden_layers=_int(raw, "num_hidden_layers", source, minimum=1),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        block_size=block_size,
        mask_token_id=mask_id,
        target_layer_ids=list(layer_ids),
        num_target_layers=num_target_layers,
        markov_rank=rank,
        markov_head_type=head_type.lower(),
        enable_confidence_head=confidence,
        confidence_head_with_markov=with_markov,
        sample_from_anchor=_bool(raw, "sample_from_anchor", source, default=True),
        rms_norm_eps=float(eps),
        rope_theta=_rope_theta(raw, source),
        max_position_embeddings=_int(raw, "max_position_embeddings", source, default=32768, minimum=1),
        target_hidden_size=target_hidden,
        draft_vocab_size=draft_vocab,
        extra=extra,
        source=source,
    )
