"""Loading a Hugging Face causal LM target (any model that returns hidden states)."""
from __future__ import annotations

from pathlib import Path

import torch

from dspark_plugin.errors import DSparkError

def load_target(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from an HF directory; safetensors weights only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise DSparkError(f"{path}: not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
