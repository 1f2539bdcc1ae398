"""Fail fast, in the API-server process, on a drafter directory vLLM would choke on later.

Without this, a bad drafter surfaces minutes later inside the engine core as a weight-loader
assertion. Here only the config and the safetensors *headers* are read (names, shapes), so the
check is instant even for large drafters; errors name the file and the key or tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dspark_plugin.checkpoint.deepspec import D2T, SHARED_TENSORS, WEIGHTS_NAME, check_against_target, \
    drafter_state_dict, weight_files
from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.errors import DSparkCheckpointError, DSparkConfigError
from dspark_plugin.model.drafter import DSparkDrafter


def _header_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    out = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name.removeprefix("model.")] = (tuple(sl.get_shape()), str(sl.get_dtype()), file)
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise DSparkCheckpointError(file, "<file>", f"not a readable safetensors file ({e})") from None
    return out


def validate_drafter_dir(
    path: str | Path,
    target_hf_config: Any | None = None,
    num_speculative_tokens: int | None = None,
) -> DSparkConfig:
    """Check config.json, tensor names/shapes and the fit to the target; return the config."""
    path = Path(path)
    cfg = DSparkConfig.from_dir(path)
    if target_hf_config is not None:
        text = target_hf_config.get_text_config() if hasattr(target_hf_config, "get_text_config") else target_hf_config
        check_against_target(cfg, int(text.vocab_size), int(text.hidden_size), int(text.num_hidden_layers))
    drafts = cfg.num_drafts
    if num_speculative_tokens is not None and not 1 <= num_speculative_tokens <= drafts:
        raise DSparkConfigError(cfg.source, "block_size",
                                f"the drafter drafts {drafts} tokens per block; num_speculative_tokens="
                                f"{num_speculative_tokens} must be between 1 and {drafts}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in drafter_state_dict(DSparkDrafter(cfg)).items()}
    found = _header_shapes(path)
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DSparkCheckpointError(path / WEIGHTS_NAME, missing[0], f"missing{more}")
    unexpected = sorted(set(found) - set(expected) - set(SHARED_TENSORS) - {"d2t", "t2d"})
    if unexpected:
        name = unexpected[0]
        raise DSparkCheckpointError(found[name][2], name,
                                    f"unexpected for {cfg.source} (markov_head_type={cfg.markov_head_type!r}, "
                                    f"markov_rank={cfg.markov_rank}, enable_confidence_head="
                                    f"{cfg.enable_confidence_head})")
    if cfg.pruned_vocab:  # vLLM's reader needs the draft-space LM head and the d2t map in the file
        expected = {**expected, D2T: (cfg.draft_vocab,), "lm_head.weight": (cfg.draft_vocab, cfg.hidden_size)}
        for name in (D2T, "lm_head.weight"):
            if name not in found:
                raise DSparkCheckpointError(path / WEIGHTS_NAME, name,
                                            f"required with draft_vocab_size={cfg.draft_vocab} in {cfg.source}")
    for name, shape in expected.items():
        got, _, file = found[name]
        if got != shape:
            raise DSparkCheckpointError(file, name, f"shape {got} != expected {shape} from {cfg.source}")
    return cfg
