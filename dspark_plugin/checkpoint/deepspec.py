"""Drafter checkpoints in the DeepSpec layout: `config.json` + safetensors, exact tensor names.

Names carry no `model.` prefix (`layers.0.self_attn.q_proj.weight`, `fc.weight`,
`markov_head.markov_w1.weight`, `confidence_head.proj.weight`, ...). `embed_tokens.weight` and
`lm_head.weight` are optional: when absent they are the target's. Safetensors only, never pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dspark_plugin.checkpoint.calibration_file import load_confidence_temperatures
from dspark_plugin.config.drafter_config import CONFIG_NAME, DSparkConfig
from dspark_plugin.decode.draft_vocab import d2t_from_target_ids, target_ids_from_d2t
from dspark_plugin.errors import DSparkCheckpointError, DSparkConfigError
from dspark_plugin.model.drafter import DSparkDrafter

WEIGHTS_NAME = "model.safetensors"
SHARED_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # optional: the target's when absent
D2T = "d2t"  # EAGLE-3 / vLLM convention: target id = draft id + d2t[draft id]


def draft_to_target_ids(d2t: torch.Tensor, cfg: DSparkConfig, file: Path | str) -> torch.Tensor:
    """Validate a `d2t` tensor against the config -> target ids [draft_vocab_size] (int64)."""
    n = cfg.draft_vocab
    if tuple(d2t.shape) != (n,):
        raise DSparkCheckpointError(file, D2T, f"shape {tuple(d2t.shape)} != ({n},) (draft_vocab_size)")
    if d2t.is_floating_point() or d2t.is_complex() or d2t.dtype == torch.bool:
        raise DSparkCheckpointError(file, D2T, f"dtype {d2t.dtype} is not an integer type")
    ids = target_ids_from_d2t(d2t)
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise DSparkCheckpointError(file, D2T, f"maps outside the target vocabulary [0, {cfg.vocab_size})")
    if torch.unique(ids).numel() != n:
        raise DSparkCheckpointError(file, D2T, "maps two draft ids to the same target token")
    return ids


def drafter_state_dict(drafter: DSparkDrafter) -> dict[str, torch.Tensor]:
    """The drafter's own tensors under their DeepSpec names."""
    out = {}
    for name, tensor in drafter.state_dict().items():
        out[name.removeprefix("backbone.")] = tensor
    return out


def save_drafter(
    drafter: DSparkDrafter,
    path: str | Path,
    dtype: torch.dtype | None = None,
    include_embeddings: bool = False,
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    drafter.cfg.save(path)
    tensors = drafter_state_dict(drafter)
    if include_embeddings:
        tensors["embed_tokens.weight"] = drafter.embed_tokens.weight
        tensors["lm_head.weight"] = drafter.lm_head.weight
    if drafter.cfg.pruned_vocab:  # the draft-space LM head and d2t are the drafter's own (vLLM's reader too)
        ids = drafter.draft_to_target
        if ids is None:
            raise ValueError("a pruned-vocabulary drafter needs draft_to_target to be saved")
        tensors["lm_head.weight"] = drafter.lm_head.weight
        tensors[D2T] = d2t_from_target_ids(ids)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in tensors.items()}
    if include_embeddings and tensors["embed_tokens.weight"].data_ptr() == tensors["lm_head.weight"].data_ptr():
        tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a drafter directory (through the index when there is one)."""
    index = path / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DSparkCheckpointError(index, "weight_map", f"unreadable index ({e})") from None
        return sorted({path / f for f in weight_map.values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(bins)}: pickle checkpoints are not loaded; convert to safetensors)" if bins else ""
        raise DSparkCheckpointError(path, "<weights>", f"no .safetensors file in the drafter directory{hint}")
    return files


def read_tensors(path: str | Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """All tensors of a drafter directory, `model.`-prefix stripped, with the file each came from."""
    path = Path(path)
    out: dict[str, tuple[torch.Tensor, Path]] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise DSparkCheckpointError(file, "<file>", "listed in the index but missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    out[name.removeprefix("model.")] = (f.get_tensor(name), file)
        except DSparkCheckpointError:
            raise
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise DSparkCheckpointError(file, "<file>", f"not a readable safetensors file ({e})") from None
    return out


def check_against_target(
    cfg: DSparkConfig, vocab_size: int, hidden_size: int, num_layers: int | None = None
) -> None:
    """Vocab / hidden size / tapped layers of the drafter must fit the target."""
    if cfg.vocab_size != vocab_size:
        raise DSparkConfigError(cfg.source, "vocab_size",
                                f"drafter vocab {cfg.vocab_size} != target vocab {vocab_size}")
    if cfg.tapped_hidden_size != hidden_size:
        key = "target_hidden_size" if cfg.target_hidden_size is not None else "hidden_size"
        raise DSparkConfigError(cfg.source, key,
                                f"drafter expects target hidden size {cfg.tapped_hidden_size}, target has {hidden_size}")
    if num_layers is not None and max(cfg.target_layer_ids) >= num_layers - 1:
        raise DSparkConfigError(cfg.source, "target_layer_ids",
                                f"{cfg.target_layer_ids} must stay below the target's last layer ({num_layers - 1})")


def _target_dims(target: Any) -> tuple[int, int, int]:
    config = getattr(target, "config", target)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size), int(text.hidden_size), int(text.num_hidden_layers)


def load_drafter(
    path: str | Path,
    target: nn.Module | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> DSparkDrafter:
    """Load a drafter directory; with an HF `target`, check it fits and share its embedding / LM head."""
    path = Path(path)
    cfg = DSparkConfig.from_dir(path)
    if target is not None:
        check_against_target(cfg, *_target_dims(target))
    tensors = read_tensors(path)
    with torch.device("meta"):
        drafter = DSparkDrafter(cfg)
    expected = drafter_state_dict(drafter)
    config_file = path / CONFIG_NAME
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise DSparkCheckpointError(path / WEIGHTS_NAME, missing[0],
                                    f"missing (and {len(missing) - 1} more)" if len(missing) > 1 else "missing")
    unexpected = sorted(set(tensors) - set(expected) - set(SHARED_TENSORS) - {D2T, "t2d"})
    if unexpected:
        raise DSparkCheckpointError(tensors[unexpected[0]][1], unexpected[0],
                                    f"unexpected for this config ({config_file}: markov_head_type="
                                    f"{cfg.markov_head_type!r}, markov_rank={cfg.markov_rank}, "
                                    f"enable_confidence_head={cfg.enable_confidence_head})")
    for name, ref in expected.items():
        tensor, file = tensors[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise DSparkCheckpointError(file, name, f"shape {tuple(tensor.shape)} != expected {tuple(ref.shape)} "
                                                    f"from {config_file}")
        if not tensor.is_floating_point():
            raise DSparkCheckpointError(file, name, f"dtype {tensor.dtype} is not floating point")
    draft_ids = None
    if cfg.pruned_vocab:
        for name in (D2T, "lm_head.weight"):
            if name not in tensors:
                raise DSparkCheckpointError(path / WEIGHTS_NAME, name, f"required with draft_vocab_size="
                                                                       f"{cfg.draft_vocab} in {config_file}")
        draft_ids = draft_to_target_ids(tensors[D2T][0], cfg, tensors[D2T][1])
    for name in SHARED_TENSORS:
        if name in tensors:
            tensor, file = tensors[name]
            rows = cfg.draft_vocab if name == "lm_head.weight" else cfg.vocab_size
            if tuple(tensor.shape) != (rows, cfg.hidden_size):
                raise DSparkCheckpointError(file, name, f"shape {tuple(tensor.shape)} != "
                                                        f"({rows}, {cfg.hidden_size}) from {config_file}")

    if dtype is None:
        dtype = next(target.parameters()).dtype if target is not None else tensors[next(iter(expected))][0].dtype
    drafter = drafter.to_empty(device=device or "cpu")
    state = {("backbone." + k if not k.startswith(("markov_head.", "confidence_head.")) else k): tensors[k][0]
             for k in expected}
    drafter.load_state_dict(state, strict=True)
    drafter.backbone.rope.reset_buffers()
    drafter = drafter.to(device=device or "cpu", dtype=dtype)

    embed = lm_head = None
    if "embed_tokens.weight" in tensors:
        embed = nn.Embedding.from_pretrained(tensors["embed_tokens.weight"][0].to(dtype), freeze=True).to(device or "cpu")
    if "lm_head.weight" in tensors:
        lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab, bias=False).to(device=device or "cpu", dtype=dtype)
        lm_head.weight.data.copy_(tensors["lm_head.weight"][0])
        lm_head.requires_grad_(False)
    if target is not None:
        embed = embed or target.get_input_embeddings()
        lm_head = lm_head or target.get_output_embeddings()
    if embed is not None and lm_head is not None:
        drafter.attach_target(embed, lm_head)
    drafter.requires_grad_(False)
    drafter.eval()
    drafter.confidence_temperatures = load_confidence_temperatures(path, cfg)
    if draft_ids is not None:
        drafter.draft_to_target = draft_ids.to(device or "cpu")
    return drafter
