"""Drafter training (docs/algorithm.md §2): target features (activation cache), anchor blocks, loss, loop.

Modules: `data` (regenerated JSONL -> token sequences), `cache` (tapped + final target hidden
states on disk, fp16 safetensors), `blocks` (many anchor blocks per sequence in one drafter pass,
block-sparse mask), `loss` (CE + L1 + confidence BCE), `state` (resumable checkpoints), `loop`.
"""
