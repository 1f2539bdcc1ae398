"""`dspark eval`: tau, per-position acceptance and speed vs target-only, per dataset."""
from __future__ import annotations

import argparse
import dataclasses
import json

NAME = "eval"
HELP = "measure acceptance and speed of a drafter against target-only decoding"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="Hugging Face causal LM directory")
    p.add_argument("--drafter", required=True, help="DSpark drafter directory (config.json + safetensors)")
    p.add_argument("--data", required=True, nargs="+", help="JSONL prompt files (one report each)")
    p.add_argument("--limit", type=int, default=None, help="prompts per file")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--gamma", type=int, default=None, help="drafts verified per round (default: the block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=["fixed", "early_stop"], default="fixed",
                   help="fixed: verify the whole block; early_stop: confidence-scheduled verify length")
    p.add_argument("--sps", default=None, help="SPS curve file for the scheduler (default: found or measured)")
    p.add_argument("--context-lookup", action="store_true",
                   help="also draft copies from the request's own tokens where they should survive longer "
                        "(what the vLLM proposer does by default)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the reports here")


def run(args: argparse.Namespace) -> int:
    import torch

    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.config.drafter_config import DSparkConfig
    from dspark_plugin.config.dtypes import parse_dtype
    from dspark_plugin.reference.evaluate import build_verify_len_fn, evaluate
    from dspark_plugin.reference.target import eos_ids, load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    DSparkConfig.from_dir(args.drafter)  # a bad drafter fails before the target is loaded
    target, tokenizer = load_target(args.target, parse_dtype(args.dtype))
    drafter = load_drafter(args.drafter, target=target)
    verify_len_fn = build_verify_len_fn(args.scheduler, target, args.target, args.drafter, args.sps)
    reports = []
    for data in args.data:
        rep = evaluate(target, tokenizer, drafter, data, args.limit, args.max_new_tokens, args.temperature,
                       args.top_k, args.top_p, args.seed, args.gamma, eos_ids(target, tokenizer),
                       verify_len_fn=verify_len_fn, context_lookup=args.context_lookup)
        reports.append(rep)
        acc = " ".join(f"{a:.2f}" for a in rep.acceptance)
        same = {None: "n/a (sampling)", True: "yes", False: f"NO (prompts {rep.mismatched_prompts})"}
        print(f"{rep.dataset}: prompts={rep.prompts} tau={rep.tau:.3f} acceptance[k]={acc} "
              f"dspark={rep.tokens_per_s_dspark:.1f} tok/s target-only={rep.tokens_per_s_target:.1f} tok/s "
              f"speedup={rep.speedup:.2f}x greedy-identical={same[rep.greedy_identical]}")
    if args.json:
        meta = {k: getattr(args, k) for k in ("target", "drafter", "limit", "max_new_tokens", "temperature",
                                               "top_k", "top_p", "gamma", "seed", "dtype", "scheduler",
                                               "context_lookup")}
        with open(args.json, "w") as f:
            json.dump({"args": meta, "reports": [dataclasses.asdict(r) for r in reports]}, f, indent=2)
    return 0 if all(r.greedy_identical is not False for r in reports) else 1
