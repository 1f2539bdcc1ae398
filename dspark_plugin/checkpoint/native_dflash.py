"""Write a drafter in vLLM's native `dflash` layout (trainer `--layout dflash`).

What that layout is and why (geometry, config, tensor names): `dspark_plugin.config.dflash_native`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark_plugin.checkpoint.deepspec import WEIGHTS_NAME, drafter_state_dict
from dspark_plugin.config.dflash_native import native_config
from dspark_plugin.config.drafter_config import CONFIG_NAME
from dspark_plugin.model.drafter import DSparkDrafter


def save_native(drafter: DSparkDrafter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `model.safetensors` that `{"method": "dflash"}` loads as they are."""
    config = native_config(drafter.cfg, dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in drafter_state_dict(drafter).items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
