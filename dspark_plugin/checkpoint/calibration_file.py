"""Per-position confidence temperatures stored beside a drafter (written by `dspark calibrate`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.errors import DSparkConfigError

CALIBRATION_NAME = "dspark_calibration.json"


def load_confidence_temperatures(path: str | Path, cfg: DSparkConfig) -> torch.Tensor | None:
    """The calibrated T_k (c'_k = sigmoid(logit(c_k) / T_k)), or None when the drafter has none."""
    file = Path(path) / CALIBRATION_NAME
    if not file.is_file() or not cfg.enable_confidence_head:
        return None
    try:
        temps = json.loads(file.read_text())["temperatures"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DSparkConfigError(file, "temperatures", f"unreadable calibration file ({e})") from None
    if (not isinstance(temps, list) or not temps
            or not all(isinstance(t, (int, float)) and t > 0 for t in temps)):
        raise DSparkConfigError(file, "temperatures", f"must be a non-empty list of positive numbers, got {temps!r}")
    return torch.tensor(temps, dtype=torch.float32)


def save_confidence_temperatures(path: str | Path, temperatures: list[float], **extra: object) -> Path:
    file = Path(path) / CALIBRATION_NAME
    file.write_text(json.dumps({"temperatures": [float(t) for t in temperatures], **extra}, indent=2) + "\n")
    return file
