"""Server start-up time, cold (empty compile cache) and warm (the same cache again), per configuration.

Each configuration gets a fresh `VLLM_CACHE_ROOT`; the server is started through the `dspark-vllm`
launcher without `--enforce-eager` (the compiled path a user runs), timed from the process start to
the first healthy `/health`, sent one greedy request, stopped, then started again on the same cache.
Configurations:
- `plain`: no speculation, the plugin installed (its patches active);
- `plain-no-plugin`: no speculation, `VLLM_PLUGINS=none` (vLLM as shipped);
- `dspark`: the README's main command (the product drafter).
With `--rounds N` every configuration is started N times (the order reversed every other round) and
the table gives medians, the samples, and each configuration over vLLM as shipped.
Writes results.json, a table (table.md) and a bar plot (startup.png, when matplotlib is installed).

    python benchmarks/startup.py --rounds 3 --out benchmarks/results/startup
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import processes  # noqa: E402
from harness.vllm_serving import VllmServer  # noqa: E402
from harness.vllm_testing import smollm2_target, vllm_env  # noqa: E402

PRODUCT_DRAFTER = REPO / "drafters" / "smollm2-135m-dspark-vanilla-b7-v8k"


def configurations(drafter: Path) -> dict[str, tuple[dict | None, dict[str, str]]]:
    spec = {"method": "dspark", "model": str(drafter), "num_speculative_tokens": 7}
    return {"plain": (None, {}), "plain-no-plugin": (None, {"VLLM_PLUGINS": "none"}), "dspark": (spec, {})}


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags)


def time_start(target: Path, spec: dict | None, env: dict[str, str], log: Path) -> tuple[float, str]:
    server = VllmServer(target, log, spec, [], env=env)
    t0 = time.monotonic()
    with server:
        startup = time.monotonic() - t0
        text = server.complete("The capital of France is", max_tokens=16)
    return startup, text


def main(argv: list[str] | None = None) -> int:
    processes.install_signal_handlers()  # a killed benchmark stops its servers
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="HF target dir (default: SmolLM2-135M in work_cache/)")
    p.add_argument("--drafter", default=str(PRODUCT_DRAFTER))
    p.add_argument("--only", nargs="+", help="run only these configurations")
    p.add_argument("--rounds", type=int, default=1,
                   help="start every configuration this many times (cold and warm each); the order of the "
                        "configurations is reversed every other round so that a drifting host favours none")
    p.add_argument("--out", default=str(REPO / "runs" / "startup"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = Path(args.target) if args.target else smollm2_target()
    configs = [(name, c) for name, c in configurations(Path(args.drafter)).items() if not args.only or name in args.only]
    samples = []
    for round_ in range(args.rounds):
        for name, (spec, extra_env) in configs if round_ % 2 == 0 else configs[::-1]:
            cache = out / f"cache-{name}-{int(time.time())}"
            env = vllm_env(VLLM_CACHE_ROOT=str(cache), **extra_env)
            row = {"config": name, "round": round_}
            for phase in ("cold", "warm"):
                log = out / f"server-{name}-{phase}-round{round_}.log"
                row[f"{phase}_s"], row[f"{phase}_text"] = time_start(target, spec, env, log)
                print(f"round {round_} {name:16s} {phase}: {row[f'{phase}_s']:.1f} s", flush=True)
            row["same_output"] = row["cold_text"] == row["warm_text"]
            samples.append(row)
            shutil.rmtree(cache, ignore_errors=True)  # hundreds of MB of compiled kernels per configuration
    results = []
    for name, _ in configs:
        rows = [r for r in samples if r["config"] == name]
        results.append({"config": name, "cold_s": statistics.median([r["cold_s"] for r in rows]),
                        "warm_s": statistics.median([r["warm_s"] for r in rows]),
                        "cold_samples": [r["cold_s"] for r in rows], "warm_samples": [r["warm_s"] for r in rows],
                        "same_output": all(r["same_output"] for r in rows)})
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
            "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags(), "target": str(target), "rounds": args.rounds,
            "drafter": args.drafter, "command": "python benchmarks/startup.py " + " ".join(argv or sys.argv[1:])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "samples": samples}, indent=2))
    lines = ["| configuration | cold start (s), median | warm start (s), median | samples cold / warm (s) | "
             "same output |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['cold_s']:.0f} | {r['warm_s']:.0f} | "
                     f"{' '.join(f'{x:.0f}' for x in r['cold_samples'])} / "
                     f"{' '.join(f'{x:.0f}' for x in r['warm_samples'])} | {'yes' if r['same_output'] else 'NO'} |")
    baseline = next((r for r in results if r["config"] == "plain-no-plugin"), None)
    if baseline:
        lines += ["", "| over vLLM as shipped (`plain-no-plugin`), medians | cold | warm |", "|---|---|---|"]
        for r in results:
            if r is not baseline:
                lines.append(f"| {r['config']} | {r['cold_s'] / baseline['cold_s']:.2f} | "
                             f"{r['warm_s'] / baseline['warm_s']:.2f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        xs = range(len(results))
        ax.bar([x - 0.2 for x in xs], [r["cold_s"] for r in results], 0.4, label="cold (median)")
        ax.bar([x + 0.2 for x in xs], [r["warm_s"] for r in results], 0.4, label="warm (median)")
        for x, r in zip(xs, results):
            ax.plot([x - 0.2] * len(r["cold_samples"]), r["cold_samples"], "k.", ms=4)
            ax.plot([x + 0.2] * len(r["warm_samples"]), r["warm_samples"], "k.", ms=4)
        ax.set_xticks(list(xs), [r["config"] for r in results])
        ax.set_ylabel("seconds to healthy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "startup.png", dpi=100)
    except ImportError:
        pass
    return 0 if all(r["same_output"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
