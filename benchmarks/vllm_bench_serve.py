"""The README's main command vs a plain server under vLLM's own load generator, `vllm bench serve`.

Both servers are started the way a user starts them, one after the other, in a fresh work tree
(harness/readme_command.py: empty compile cache and learned-curve cache, so the first start of each
compiles and the DSpark server learns its step rate from nothing):
- plain: `dspark-vllm serve work_cache/smollm2-135m --dtype float32` (the README command without
  its speculative flag);
- dspark: the README's main command as printed.
Each gets `--port` only. Against each, `dspark-vllm bench serve` (vLLM's client; random prompts)
runs with the issue's settings by default: 128 input / 64 output tokens, 32 prompts, at most 8 in
flight. `--dataset mt-bench` sends the first `--num-prompts` MT-Bench questions as chat requests
instead (written as a ShareGPT file, `--backend openai-chat`, greedy, `--output-len` tokens at most),
e.g. one at a time: `--dataset mt-bench --max-concurrency 1 --num-prompts 16 --output-len 128`. `--rounds N` repeats the pair in alternating order (plain, dspark, dspark, plain, ...), the
servers restarted each time (so rounds after the first start from the compile cache and the saved
curve), and reports the per-round ratio and the geometric mean. Writes results.json and summary.md.

    python benchmarks/vllm_bench_serve.py --out benchmarks/results/vllm_bench_serve
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import processes  # noqa: E402
from harness.shared_data import DATA  # noqa: E402
from harness.readme_command import ShellServer, readme_main_command, work_tree  # noqa: E402
from harness.vllm_testing import smollm2_target  # noqa: E402
from dspark_plugin.reference.prompts import read_prompts  # noqa: E402


KEYS = ("output_throughput", "request_throughput", "mean_tpot_ms", "median_tpot_ms", "mean_ttft_ms",
        "completed")


def plain_command(readme_serve: str) -> str:
    """The README command without its speculative flag and value."""
    words = readme_serve.replace("\\\n", " ").split()
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w in ("--speculative-model", "--speculative-config", "--spec-model"):
            skip = True
            continue
        out.append(w)
    return " ".join(out)


def dataset_args(args: argparse.Namespace, result_dir: Path) -> list[str]:
    """`vllm bench serve`'s backend and dataset flags: random token prompts to /v1/completions, or
    MT-Bench questions as greedy chat requests (a ShareGPT-format file: vLLM's loader for it needs no
    extra package)."""
    if args.dataset == "random":
        return ["--backend", "vllm", "--dataset-name", "random", "--random-input-len", str(args.input_len),
                "--random-output-len", str(args.output_len)]
    path = result_dir / "mt_bench_sharegpt.json"
    rows = [{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": ""}]}
            for p in read_prompts(DATA / "mt_bench.jsonl", limit=args.num_prompts)]
    path.write_text(json.dumps(rows))
    return ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--dataset-name", "sharegpt",
            "--dataset-path", str(path), "--sharegpt-output-len", str(args.output_len), "--temperature", "0"]


def bench(server: ShellServer, model: str, args: argparse.Namespace, result_dir: Path, tag: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dspark_plugin.vllm.launcher", "bench", "serve",
           "--base-url", server.url, "--model", model, "--tokenizer", str(server.cwd / model),
           *dataset_args(args, result_dir), "--num-prompts", str(args.num_prompts),
           "--max-concurrency", str(args.max_concurrency), "--seed", str(args.seed), "--save-result",
           "--result-dir", str(result_dir), "--result-filename", f"{tag}.json"]
    proc = processes.run(cmd, capture_output=True, text=True, timeout=1800)
    (result_dir / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({tag}): {(proc.stdout + proc.stderr)[-3000:]}")
    data = json.loads((result_dir / f"{tag}.json").read_text())
    return {k: data.get(k) for k in KEYS}


def main(argv: list[str] | None = None) -> int:
    processes.install_signal_handlers()  # a killed benchmark stops its servers
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("random", "mt-bench"), default="random")
    p.add_argument("--input-len", type=int, default=128, help="random prompts' length")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vllm_bench_serve"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    serve, request, _ = readme_main_command()
    commands = {"plain": plain_command(serve), "dspark": serve}
    model = request["model"]
    tree = work_tree(Path(tempfile.mkdtemp(prefix="bench-serve-tree-")), smollm2_target())
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores", "servers": commands,
        "client": (f"vllm bench serve --dataset-name random --random-input-len {args.input_len} --random-output-len "
                   f"{args.output_len}" if args.dataset == "random" else
                   f"vllm bench serve --backend openai-chat --dataset-name sharegpt (MT-Bench questions) "
                   f"--sharegpt-output-len {args.output_len} --temperature 0")
                  + f" --num-prompts {args.num_prompts} --max-concurrency {args.max_concurrency}",
        "rounds": [],
    }
    for rnd in range(args.rounds):
        order = ["plain", "dspark"] if rnd % 2 == 0 else ["dspark", "plain"]
        row: dict[str, Any] = {}
        for name in order:
            tag = f"{name}-round{rnd + 1}"
            server = ShellServer(commands[name], tree, out / f"server-{tag}.log")
            server.start(timeout=900)
            try:
                row[name] = {**bench(server, model, args, out, tag), "startup_s": server.startup_s}
            finally:
                server.stop()
            if name == "dspark":
                row[name]["proposer_log"] = [line.split("dspark-plugin ", 1)[1]
                                             for line in server.log_tail(10**7).splitlines()
                                             if "dspark-plugin scheduler" in line][-2:]
            print(f"[{tag}] {row[name]['output_throughput']:.1f} output tok/s, mean TPOT "
                  f"{row[name]['mean_tpot_ms']:.0f} ms, started in {server.startup_s:.0f} s", flush=True)
        row["ratio"] = row["dspark"]["output_throughput"] / row["plain"]["output_throughput"]
        result["rounds"].append(row)
        (out / "results.json").write_text(json.dumps(result, indent=2))
    ratios = [r["ratio"] for r in result["rounds"]]
    result["geomean_ratio"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"### `vllm bench serve`: the README command vs a plain server ({result['date']})", "",
             f"`{result['command']}`", "", f"Machine: {result['machine']}. Client: `{result['client']}`.", "",
             "| round | plain out tok/s | dspark out tok/s | dspark / plain | plain TPOT ms | dspark TPOT ms |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rounds"], 1):
        lines.append(f"| {i} | {r['plain']['output_throughput']:.1f} | {r['dspark']['output_throughput']:.1f} | "
                     f"{r['ratio']:.2f} | {r['plain']['mean_tpot_ms']:.0f} | {r['dspark']['mean_tpot_ms']:.0f} |")
    lines += ["", f"Geometric mean ratio: {result['geomean_ratio']:.2f}", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
