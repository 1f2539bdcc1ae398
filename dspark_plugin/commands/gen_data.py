"""`dspark gen-data`: regenerate responses to dataset prompts with the target model itself."""
from __future__ import annotations

import argparse

NAME = "gen-data"
HELP = "Regenerate training responses with the target (chat template, batched, resumable JSONL)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="Hugging Face causal LM directory")
    parser.add_argument("--prompts", required=True, nargs="+", help="JSONL prompt files (interleaved)")
    parser.add_argument("--out", required=True, help="output JSONL; appended to, prompts already in it are skipped")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts (after interleaving)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="skip longer prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores; 1 is faster on a crowded machine)")


def run(args: argparse.Namespace) -> int:
    from dspark_plugin.train.gen_data import generate_dataset

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    n = generate_dataset(
        args.target, args.prompts, args.out, limit=args.limit, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens, seed=args.seed,
    )
    print(f"appended {n} responses to {args.out}")
    return 0
