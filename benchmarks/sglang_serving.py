"""Serving benchmark on real SGLang servers (CPU here): a plain server vs DSpark through the plugin.

Run it with SGLang's venv (tests/sglang/README.md):

    .venv-sglang/bin/python benchmarks/sglang_serving.py --out benchmarks/results/sglang_serving

One run starts the servers one after another on 127.0.0.1 through the `dspark-sglang` launcher (the
README's command; the plain server is the same command without the speculative flags), sends
MT-Bench and GSM8K-test prompts (chat template, greedy) through SGLang's /generate at each
concurrency, and records output tokens/s, the tokens each decode step emitted per request
(`completion_tokens / spec_verify_ct`) and the worker's own step breakdown (its "decode steps ...
draft / verify / accept" log line). Writes JSON and a markdown table; ratios are to the plain server
of the same run. Greedy outputs are compared too: speculation must not change a token.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import re
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dspark_plugin.reference.prompts import read_prompts  # noqa: E402
from harness import processes  # noqa: E402
from harness.shared_data import DATA  # noqa: E402
from harness.sglang_serving import free_port, launch, wait_healthy  # noqa: E402
from harness.vllm_testing import smollm2_target  # noqa: E402

PRODUCT_DRAFTER = REPO / "drafters" / "smollm2-135m-dspark-vanilla-b7-v8k"
# name -> the launcher's arguments beyond the model and address. `plain` is what a user runs without
# speculation (SGLang's overlap scheduler on); `plain-sync` switches overlap off, as speculation does here.
CONFIGS = {
    "plain": lambda drafter: [],
    "plain-sync": lambda drafter: ["--disable-overlap-schedule"],
    "dspark": lambda drafter: ["--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", str(drafter)],
    # SGLang's own prompt lookup, as a chain of 7 drafts like the product drafter's block (SGLang's default
    # is a tree of 12 draft tokens).
    "ngram": lambda drafter: ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "8",
                              "--speculative-ngram-max-bfs-breadth", "1"],
}
STEP_LINE = re.compile(r"PLUGIN_DSPARK: \d+ decode steps.*")


def generate(port: int, text: str, max_tokens: int) -> dict:
    body = json.dumps({"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_tokens}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.loads(r.read())


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def run_server(name: str, extra: list[str], target: Path, sets: dict[str, list[str]], concurrencies: list[int],
               max_tokens: int, out_dir: Path) -> dict:
    port = free_port()
    log_path = out_dir / f"server-{name}.log"
    result: dict = {"name": name, "args": extra, "runs": []}
    with open(log_path, "w") as log:
        proc = launch(target, port, extra, log)
        try:
            try:
                result["startup_s"] = wait_healthy(port, proc, timeout=600.0)
            except AssertionError:   # a configuration that does not start here is a result, not the end of the run
                log.flush()
                errors = [line.strip() for line in log_path.read_text().splitlines()
                          if "Error" in line or "CRITICAL" in line]
                result["failed"] = " ".join(errors[-2:]) if errors else "the server exited before it was healthy"
                print(f"{name:8s} did not start: {result['failed']}", flush=True)
                return result
            generate(port, chat("Hello"), 8)   # first-request costs out of the timings
            for c in concurrencies:
                for dataset, prompts in sets.items():
                    t0 = time.perf_counter()
                    with cf.ThreadPoolExecutor(c) as pool:
                        outs = list(pool.map(lambda p: generate(port, chat(p), max_tokens), prompts))
                    wall = time.perf_counter() - t0
                    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
                    steps = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
                    result["runs"].append({"concurrency": c, "dataset": dataset, "wall_s": wall, "tokens": tokens,
                                           "tok_s": tokens / wall, "tokens_per_step": tokens / steps if steps else None,
                                           "output_ids": [o["output_ids"] for o in outs]})
                    print(f"{name:8s} c={c} {dataset:9s} {tokens / wall:6.2f} tok/s"
                          + (f", {tokens / steps:.2f} tokens per request-step" if steps else ""), flush=True)
        finally:
            processes.stop_group(proc.pid)
    result["step_lines"] = STEP_LINE.findall(log_path.read_text())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=Path, default=None, help="HF target dir (default: SmolLM2-135M, prepared)")
    ap.add_argument("--drafter", type=Path, default=PRODUCT_DRAFTER)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per dataset")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "sglang_serving")
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), default=["plain", "dspark"],
                    help="configurations, in this order; ratios are to the first")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.target or smollm2_target()
    sets = {"mt_bench": read_prompts(DATA / "mt_bench.jsonl", limit=args.prompts),
            "gsm8k": read_prompts(DATA / "gsm8k_test.jsonl", limit=args.prompts)}
    started = dt.datetime.now(dt.timezone.utc)
    servers = [run_server(name, CONFIGS[name](args.drafter), target, sets, args.concurrency, args.max_tokens,
                          args.out) for name in args.only]
    base = servers[0]
    rows = ["| configuration | concurrency | dataset | tok/s | x first | tokens per request-step | greedy identical |",
            "|---|---|---|---|---|---|---|"]
    for server in servers:
        if "failed" in server:
            rows.append(f"| {server['name']} | - | - | did not start: {server['failed']} | | | |")
            continue
        for a, b in zip(base["runs"], server["runs"]):
            same = a["output_ids"] == b["output_ids"]
            rows.append(f"| {server['name']} | {b['concurrency']} | {b['dataset']} | {b['tok_s']:.2f} | "
                        f"{b['tok_s'] / a['tok_s']:.2f} | {b['tokens_per_step'] or 1:.2f} | {'yes' if same else 'NO'} |")
    table = "\n".join(rows)
    step_lines = next((s["step_lines"] for s in reversed(servers) if s.get("step_lines")), [])   # DSpark's
    meta = {"started": started.isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "drafter": str(args.drafter), "max_tokens": args.max_tokens,
            "prompts": args.prompts, "concurrency": args.concurrency}
    for s in servers:
        for r in s["runs"]:
            r.pop("output_ids")
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "servers": servers}, indent=1))
    (args.out / "table.md").write_text(table + "\n\n" + "\n".join(step_lines) + "\n")
    print(table)
    print("\n".join(step_lines))


if __name__ == "__main__":
    main()
