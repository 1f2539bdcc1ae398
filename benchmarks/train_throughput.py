"""Trainer throughput: trained blocks per second of `dspark train`, per recipe, in one run.

Every recipe trains the same SmolLM2-135M drafter geometry (1 layer, 5 taps, block 7, Markov rank
64, vanilla head) from the same activation cache (built once here: taps, final states and the
log-partition of the target's logits) on the first `--rows` sequences of the committed training
data, for `--warmup` + `--steps` optimizer steps; the per-step wall time comes from the trainer's
own log (`seconds`, `blocks`, `tokens` of each step), the warm-up steps are dropped. Recipes:
- `shipped-1t`: what drafters/train_smollm2.sh ran until 2026-12-06 (full vocabulary, 2 sequences x
  16 anchors a step, one thread per trainer, four trainers side by side);
- `shipped-2t`: the same on both cores;
- `fast`: the pruned 8k draft vocabulary from the first step (train/loss.py), 4 x 32 anchors a step,
  both cores.
Writes results.json, table.md and train_throughput.png (when matplotlib is installed).

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "drafters" / "data" / "smollm2-135m-greedy-responses.jsonl"
TARGET = REPO / "work_cache" / "smollm2-135m"
COMMON = ["--layers", "1", "--num-taps", "5", "--block-size", "7", "--markov-rank", "64", "--head", "vanilla",
          "--lr", "3e-3", "--seed", "0", "--no-progress", "--save-every", "100000"]
RECIPES = {
    "shipped-1t": ["--batch-size", "2", "--anchors-per-seq", "16", "--threads", "1"],
    "shipped-2t": ["--batch-size", "2", "--anchors-per-seq", "16", "--threads", "2"],
    "fast": ["--draft-vocab", "8192", "--batch-size", "4", "--anchors-per-seq", "32", "--threads", "2"],
}


def cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def run_recipe(dspark: str, target: str, data: Path, cache: Path, out: Path, args: list[str],
               steps: int) -> list[dict]:
    cmd = [dspark, "train", "--target", target, "--data", str(data), "--cache", str(cache), "--out", str(out),
           "--steps", str(steps), *COMMON, *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]


def summarize(log: list[dict], warmup: int) -> dict:
    timed = log[warmup:]
    seconds = sum(r["seconds"] for r in timed)
    return {"steps": len(timed), "seconds": round(seconds, 3),
            "blocks_per_s": round(sum(r["blocks"] for r in timed) / seconds, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in timed) / seconds, 1),
            "seconds_per_step": round(seconds / len(timed), 3),
            "final_loss": round(log[-1]["loss"], 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput"))
    p.add_argument("--work", default=str(REPO / "work_cache" / "train_throughput"),
                   help="activation cache and training runs (git-ignored; ~100 MB)")
    p.add_argument("--target", default=str(TARGET))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--rows", type=int, default=64, help="sequences (the first rows of --data)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per recipe")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    args = p.parse_args(argv)

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    dspark = str(Path(sys.executable).with_name("dspark"))
    data = work / "data.jsonl"
    data.write_text("".join(open(args.data).readlines()[: args.rows]))
    cache = work / "act_cache"
    subprocess.run([dspark, "train", "--target", args.target, "--data", str(data), "--cache", str(cache),
                    "--out", str(work / "cache_builder"), "--cache-only", *COMMON], check=True,
                   stdout=subprocess.DEVNULL)
    results = {}
    for name in args.only:
        run_dir = work / "runs" / name
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        log = run_recipe(dspark, args.target, data, cache, run_dir, RECIPES[name], args.warmup + args.steps)
        results[name] = {"args": RECIPES[name], **summarize(log, args.warmup)}
        print(name, results[name], flush=True)
    base = max((results[n]["blocks_per_s"] for n in results if n.startswith("shipped")), default=None)
    for r in results.values():
        r["vs_best_shipped"] = round(r["blocks_per_s"] / base, 2) if base else None
    meta = {"date": dt.date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()} cores",
            "command": "python benchmarks/train_throughput.py " + " ".join(argv or sys.argv[1:]),
            "rows": args.rows, "steps": args.steps, "warmup": args.warmup}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"Trainer throughput ({meta['date']}, {meta['machine']}; `{meta['command']}`)", "",
             "| recipe | args | s/step | blocks/s | tokens/s | vs best shipped |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | `{' '.join(r['args'])}` | {r['seconds_per_step']} | {r['blocks_per_s']} | "
                     f"{r['tokens_per_s']} | {r['vs_best_shipped']}x |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(results), [r["blocks_per_s"] for r in results.values()])
        ax.set_ylabel("trained blocks / s")
        ax.set_title("dspark train throughput (SmolLM2-135M drafter)")
        fig.tight_layout()
        fig.savefig(out / "train_throughput.png", dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
