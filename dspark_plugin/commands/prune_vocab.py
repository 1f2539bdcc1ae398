"""`dspark prune-vocab`: write a copy of a drafter that drafts from the target's most frequent tokens."""
from __future__ import annotations

import argparse

NAME = "prune-vocab"
HELP = "Restrict a drafter to the N tokens most frequent in the target's responses (draft_vocab_size + d2t)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="Hugging Face causal LM directory (its LM head rows are kept)")
    parser.add_argument("--drafter", required=True, help="full-vocabulary DSpark drafter directory")
    parser.add_argument("--data", required=True, nargs="+", help="gen-data JSONL (response_ids are counted)")
    parser.add_argument("--size", type=int, default=8192, help="draft vocabulary size")
    parser.add_argument("--out", required=True, help="output drafter directory")


def run(args: argparse.Namespace) -> int:
    from dspark_plugin.train.prune_vocab import prune_drafter, select_draft_vocab, token_counts
    from dspark_plugin.reference.target import eos_ids, load_target

    target, tokenizer = load_target(args.target)
    vocab = target.get_output_embeddings().weight.shape[0]
    counts = token_counts(args.data)
    ids = select_draft_vocab(counts, args.size, vocab, keep=eos_ids(target, tokenizer))
    kept = set(ids.tolist())
    total = sum(counts.values())
    covered = sum(c for t, c in counts.items() if t in kept)
    prune_drafter(args.drafter, target.get_output_embeddings().weight, ids, args.out)
    print(f"{args.out}: {len(ids)} of {vocab} tokens; they cover {covered}/{total} "
          f"({100 * covered / max(total, 1):.2f}%) of the response tokens in {', '.join(args.data)}")
    return 0
