"""Patch `cpu_assign_req_to_token_pool`: speculative decoding's KV-slot bookkeeping in plain torch on CPU.

Replaces: `sglang.srt.mem_cache.allocation:assign_req_to_token_pool_func` and the name bound to it by
`from ... import` in `sglang.srt.speculative.spec_utils`, in the scheduler process (where the
speculative worker allocates). Scope: every server, on a host without CUDA, outside SGLang's CPU
engine; only speculative decoding calls it (`alloc_for_spec_decode`, the workers), so a plain
server never reaches it.

Why: `assign_req_to_token_pool_func` writes the freshly allocated KV slots of each request into
`req_to_token[req, start:end]`. Off SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1` needs a CPU
build of `sgl_kernel` that PyPI does not ship) it launches a Triton kernel, which fails on CPU
tensors ("0 active drivers"), so every speculative step dies at its first allocation. The
replacement does the same scatter with torch indexing for CPU tensors and hands any other tensor
to SGLang's function unchanged.

Upstream form: `patches/sglang-0.5.23-cpu-assign-req-to-token-pool.diff` (the same torch fallback
inside `assign_req_to_token_pool_func`, taken for CPU tensors when the `sgl_kernel` CPU op is not
in use). Delete when the supported SGLang's function handles CPU tensors without `sgl_kernel`
(`applies()` then finds no Triton launch on that path).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("sglang.dspark_plugin.patches.cpu_assign_req_to_token_pool")

NAME = "cpu_assign_req_to_token_pool"
SCOPE = "every server"
REPLACES = ("sglang.srt.mem_cache.allocation:assign_req_to_token_pool_func",
            "sglang.srt.speculative.spec_utils:assign_req_to_token_pool_func")


def assign_req_to_token_pool_torch(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                   start_offset: torch.Tensor, end_offset: torch.Tensor,
                                   out_cache_loc: torch.Tensor, batch_size: int) -> None:
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = the i-th run of out_cache_loc (runs are
    consecutive, in request order), for the first `batch_size` requests: the Triton kernel's contract."""
    starts = start_offset[:batch_size].long()
    lengths = (end_offset[:batch_size].long() - starts).clamp_min(0)
    total = int(lengths.sum())
    if total == 0:
        return
    rows = torch.repeat_interleave(req_pool_indices[:batch_size].long(), lengths)
    run_start = torch.cumsum(lengths, 0) - lengths   # where each request's run begins in out_cache_loc
    within = torch.arange(total, device=lengths.device) - torch.repeat_interleave(run_start, lengths)
    cols = torch.repeat_interleave(starts, lengths) + within
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


def _make_wrapper(sglang_func: Any) -> Any:
    def assign_req_to_token_pool_func(req_pool_indices, req_to_token, start_offset, end_offset,
                                      out_cache_loc, batch_size):
        if req_to_token.device.type == "cpu":
            return assign_req_to_token_pool_torch(req_pool_indices, req_to_token, start_offset, end_offset,
                                                  out_cache_loc, batch_size)
        return sglang_func(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, batch_size)

    assign_req_to_token_pool_func.__wrapped__ = sglang_func
    return assign_req_to_token_pool_func


def applies() -> bool:
    """On a host without CUDA, outside SGLang's CPU engine, while the installed function still
    launches its Triton kernel there."""
    from dspark_plugin.sglang.patches import cpu_host_outside_cpu_engine

    if not cpu_host_outside_cpu_engine():
        return False
    from sglang.srt.mem_cache import allocation

    from dspark_plugin.patching import source_has

    return not allocation._is_cpu and source_has(allocation.assign_req_to_token_pool_func,
                                                 "assign_req_to_token_pool[(batch_size,)]")


def install() -> None:
    from sglang.srt.mem_cache import allocation
    from sglang.srt.speculative import spec_utils

    from dspark_plugin.patching import replace

    wrapper = _make_wrapper(allocation.assign_req_to_token_pool_func)
    replace(allocation, "assign_req_to_token_pool_func", wrapper, NAME)
    # spec_utils bound the function by name at import; workers call it through that name.
    if getattr(spec_utils, "assign_req_to_token_pool_func", None) is wrapper.__wrapped__:
        replace(spec_utils, "assign_req_to_token_pool_func", wrapper, NAME)
    logger.info("dspark-plugin: req_to_token slot assignment runs in torch for CPU tensors (no Triton driver)")
