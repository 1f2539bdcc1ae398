"""Dtype names: the one table the command line, the reference target loader and the trainer read."""
from __future__ import annotations

import torch

from dspark_plugin.errors import DSparkError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
# What a drafter checkpoint is written in (`dspark train --save-dtype`).
SAVE_DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DSparkError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
