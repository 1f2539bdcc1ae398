"""Resumable trainer state, safetensors only: fp32 drafter weights, AdamW moments, step counter."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_DIR = "trainer_state"


def save_state(out: Path, drafter: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               extra: dict) -> None:
    d = Path(out) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in drafter.named_parameters()}
    weights = {n: t.detach().contiguous() for n, t in drafter.state_dict().items()}
    moments = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            moments[f"exp_avg.{n}"] = st["exp_avg"].contiguous()
            moments[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].contiguous()
            moments[f"step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    # Write everything under temporary names first: a kill mid-save keeps the previous state.
    for name, tensors in (("weights", weights), ("optimizer", moments)):
        save_file(tensors, str(d / f"{name}.safetensors.tmp"))
    (d / "state.json.tmp").write_text(json.dumps({"step": step, **extra}, indent=2) + "\n")
    for name in ("weights.safetensors", "optimizer.safetensors", "state.json"):
        os.replace(d / f"{name}.tmp", d / name)


def load_state(out: Path, drafter: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore weights and optimizer in place; returns state.json (with "step") or None if absent."""
    d = Path(out) / STATE_DIR
    if not (d / "state.json").is_file():
        return None
    meta = json.loads((d / "state.json").read_text())
    drafter.load_state_dict(load_file(str(d / "weights.safetensors")), strict=True)
    moments = load_file(str(d / "optimizer.safetensors"))
    params = dict(drafter.named_parameters())
    for n, p in params.items():
        if f"exp_avg.{n}" in moments:
            optimizer.state[p] = {
                "step": moments[f"step.{n}"].reshape(()),
                "exp_avg": moments[f"exp_avg.{n}"],
                "exp_avg_sq": moments[f"exp_avg_sq.{n}"],
            }
    return meta
