"""`dspark train`: train a DSpark (or DFlash-style) drafter for a Hugging Face target."""
from __future__ import annotations

import argparse

NAME = "train"
HELP = "Train a DSpark drafter on target-regenerated data (writes a DeepSpec-format drafter dir)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--target", required=True, help="Hugging Face causal LM directory")
    p.add_argument("--data", required=True, help="JSONL from `dspark gen-data`")
    p.add_argument("--out", required=True, help="drafter directory (config.json + model.safetensors + trainer_state/)")
    p.add_argument("--head", default="vanilla", choices=["vanilla", "gated", "rnn", "none"],
                   help="sequential head; 'none' = DFlash-style baseline (CE only, no Markov/confidence head)")
    p.add_argument("--layout", default="deepspec", choices=["deepspec", "dflash"],
                   help="output: 'deepspec' (anchor-first, vLLM method dspark via the plugin) or 'dflash' "
                        "(vLLM's native dflash drafter: bonus token + masks, block_size - 1 drafts; needs --head none)")
    p.add_argument("--layers", type=int, default=1, help="draft decoder layers")
    p.add_argument("--num-taps", type=int, default=5, help="tapped target layers (docs/algorithm.md §2 formula)")
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--markov-rank", type=int, default=64)
    p.add_argument("--no-confidence", action="store_true", help="train without the confidence head")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="train inside a pruned draft vocabulary of the N tokens most frequent in the data's "
                        "responses (d2t checkpoint; several times faster per step on a CPU)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None, help="passes over the sequences (default 1)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=float, default=0.04, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--anchors-per-seq", type=int, default=16, help="anchor blocks per sequence")
    p.add_argument("--max-len", type=int, default=1024, help="truncate sequences to this many tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>/trainer_state if present")
    p.add_argument("--cache", default=None, help="activation cache dir (default <out>/act_cache); share it between drafters")
    p.add_argument("--no-cache", action="store_true", help="run the target inside the loop instead of caching")
    p.add_argument("--cache-only", action="store_true", help="build the activation cache and exit")
    p.add_argument("--no-extend-cache", action="store_true",
                   help="train only on sequences already in --cache (another process builds it)")
    p.add_argument("--cache-matmul", default=None, choices=["float32", "bfloat16"],
                   help="matrix products of the cache build's target pass (bfloat16: ~2x faster on CPUs with "
                        "AVX-512 bf16; norms and residuals stay float32); default float32 for a new cache, "
                        "an existing cache keeps its own")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and exit after this step (the schedule still spans --steps); --resume continues")
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--init", default="target", choices=["target", "random"],
                   help="draft layers start as copies of the target's last layers (default) or random")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dspark_plugin.train.loop import TrainOptions, train

    opts = TrainOptions(
        target=args.target, data=args.data, out=args.out, head=args.head, layout=args.layout, layers=args.layers,
        num_taps=args.num_taps, block_size=args.block_size, markov_rank=args.markov_rank,
        confidence=not args.no_confidence, steps=args.steps, epochs=args.epochs, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, batch_size=args.batch_size,
        anchors_per_seq=args.anchors_per_seq, max_len=args.max_len, seed=args.seed, resume=args.resume,
        cache=args.cache, no_cache=args.no_cache, cache_only=args.cache_only,
        extend_cache=not args.no_extend_cache, cache_matmul=args.cache_matmul, save_every=args.save_every, stop_after=args.stop_after,
        save_dtype=args.save_dtype, mask_token_id=args.mask_token_id, threads=args.threads,
        progress=not args.no_progress, init=args.init, draft_vocab=args.draft_vocab,
    )
    out = train(opts)
    print(f"wrote {out}")
    return 0
