"""Patch `cpu_extend_attention`: an extend after a cached prefix attends from its own tokens only.

Replaces: `sglang.srt.layers.attention.torch_native_backend:TorchNativeAttnBackend._run_sdpa_forward_extend`,
in the scheduler process (where the model runs). Scope: every server, on a host without CUDA, outside
SGLang's CPU engine (the `torch_native` attention backend the launcher selects there). A plain
server reaches it on every prefill; it computes something different from SGLang's code only where
the extend has a cached prefix (a radix-cache hit, a later chunk of a chunked prefill, and the
speculative worker's verify pass, the case it is for).

Why: SGLang's loop gives each sequence a query as long as the *whole* sequence (prefix included, the
prefix rows left uninitialised), runs causal attention over all of it and keeps the extend rows. A
verify pass of k + 1 tokens after a context of L therefore costs L x L attention per layer instead
of (k + 1) x L: at a few hundred tokens of context that made any DSpark verify step on SmolLM2-135M
take ~1.7-1.9 plain decode steps whatever k was (the learned step-rate curve at one request: 83 ms
at B = 1, 140 ms at B = 2, 159 ms at B = 8; BENCHMARKS.md, "SGLang serving"), so no draft could pay.
The replacement attends from the extend rows only, with the causal mask aligned to the end of the
sequence (query j sees keys 0 .. prefix + j), the same scores each kept row had; an extend with no
prefix keeps SGLang's own `is_causal` call, and anything it does not handle (cross attention,
encoder lengths, a sliding window, a non-causal layer) goes to SGLang's method unchanged.

Upstream form: `patches/sglang-0.5.23-cpu-extend-attention.diff` (the same change inside
`_run_sdpa_forward_extend`). Delete when the supported SGLang's loop no longer builds the
prefix-long query (`applies()` then no longer finds `per_req_query_redudant` in it).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

logger = logging.getLogger("sglang.dspark_plugin.patches.cpu_extend_attention")

NAME = "cpu_extend_attention"
SCOPE = "every server"
REPLACES = ("sglang.srt.layers.attention.torch_native_backend:TorchNativeAttnBackend._run_sdpa_forward_extend",)


def extend_attention(query: torch.Tensor, output: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     extend_prefix_lens: torch.Tensor, extend_seq_lens: torch.Tensor, scaling: float | None = None,
                     enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of each sequence's extend rows over its whole sequence.

    query / output: [tokens, heads, head_dim]; k_cache / v_cache: [pool slots, kv heads, head_dim];
    sequence i owns extend_seq_lens[i] consecutive query rows and reads its seq_lens[i] keys through
    req_to_token[req_pool_indices[i]], the last extend_seq_lens[i] of them its own."""
    q = query.movedim(0, 1)                                              # [heads, tokens, head_dim]
    start = 0
    for i in range(seq_lens.shape[0]):
        n, prefix, total = int(extend_seq_lens[i]), int(extend_prefix_lens[i]), int(seq_lens[i])
        end = start + n
        slots = req_to_token[req_pool_indices[i], :total]
        key = k_cache[slots].movedim(0, 1)                               # [kv heads, total, head_dim]
        value = v_cache[slots].movedim(0, 1)
        if key.dtype != q.dtype:
            key, value = key.to(q.dtype), value.to(q.dtype)
        if prefix == 0:
            mask, causal = None, True                                    # square: SGLang's own call
        else:   # query j (at position prefix + j) sees keys 0 .. prefix + j
            mask = (torch.arange(total, device=q.device)[None, :]
                    <= prefix + torch.arange(n, device=q.device)[:, None])
            causal = False
        out = scaled_dot_product_attention(q[:, start:end].unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                                           attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=enable_gqa)
        output[start:end] = out.squeeze(0).movedim(0, 1)
        start = end
    return output


def _make_wrapper(sglang_method: Any) -> Any:
    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                 enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
        if (not causal or is_cross_attn or encoder_lens is not None
                or (sliding_window_size is not None and sliding_window_size > -1)):
            return sglang_method(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                 extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling,
                                 enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                                 sliding_window_size=sliding_window_size)
        return extend_attention(query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                                extend_prefix_lens, extend_seq_lens, scaling=scaling, enable_gqa=enable_gqa)

    _run_sdpa_forward_extend.__wrapped__ = sglang_method
    return _run_sdpa_forward_extend


def applies() -> bool:
    """On a host without CUDA, outside SGLang's CPU engine, while the installed loop still builds a
    query as long as the whole sequence."""
    from dspark_plugin.sglang.patches import cpu_host_outside_cpu_engine

    if not cpu_host_outside_cpu_engine():
        return False
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from dspark_plugin.patching import source_has

    return source_has(TorchNativeAttnBackend._run_sdpa_forward_extend, "per_req_query_redudant")


def install() -> None:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from dspark_plugin.patching import replace

    replace(TorchNativeAttnBackend, "_run_sdpa_forward_extend",
            _make_wrapper(TorchNativeAttnBackend._run_sdpa_forward_extend), NAME)
    logger.info("dspark-plugin: an extend after a cached prefix (a verify pass, a radix hit) attends from its "
                "own tokens only (torch_native computed the whole sequence)")
