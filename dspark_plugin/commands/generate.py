"""`dspark generate`: one completion with the reference runner."""
from __future__ import annotations

import argparse

NAME = "generate"
HELP = "generate a completion with a target + DSpark drafter (engine-free reference runner)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="Hugging Face causal LM directory")
    p.add_argument("--drafter", default=None, help="DSpark drafter directory (omit for target-only)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--gamma", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=["fixed", "early_stop"], default="fixed",
                   help="fixed: verify the whole block; early_stop: confidence-scheduled verify length")
    p.add_argument("--sps", default=None, help="SPS curve file for the scheduler (default: found or measured)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.config.drafter_config import DSparkConfig
    from dspark_plugin.config.dtypes import parse_dtype
    from dspark_plugin.reference.evaluate import build_verify_len_fn
    from dspark_plugin.reference.prompts import encode_prompt
    from dspark_plugin.reference.runner import ReferenceRunner
    from dspark_plugin.reference.target import eos_ids, load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.drafter:
        DSparkConfig.from_dir(args.drafter)  # a bad drafter fails before the target is loaded
    target, tokenizer = load_target(args.target, parse_dtype(args.dtype))
    drafter = load_drafter(args.drafter, target=target) if args.drafter else None
    fn = build_verify_len_fn(args.scheduler, target, args.target, args.drafter, args.sps) if drafter else None
    runner = ReferenceRunner(target, drafter, gamma=args.gamma, verify_len_fn=fn)
    res = runner.generate(encode_prompt(tokenizer, args.prompt), args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed, eos_ids(target, tokenizer))
    print(tokenizer.decode(res.tokens, skip_special_tokens=True))
    mode = f"DSpark tau={res.tau:.2f} over {res.num_rounds} target forwards" if drafter else "target-only"
    print(f"[{len(res.tokens)} tokens in {res.seconds:.2f}s = {len(res.tokens) / max(res.seconds, 1e-9):.1f} tok/s, "
          f"{mode}]")
    return 0
