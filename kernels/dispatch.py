"""One entry point per drafting / verification operation: Triton on CUDA, the PyTorch twin elsewhere.

The Triton kernel runs when Triton imports, a GPU driver is active and the tensors live on CUDA.
CPU tensors (and machines without Triton) get the twin, which computes the same function with
ordinary torch ops. DSPARK_FORCE_TRITON=1 (with TRITON_INTERPRET=1 on CPU) forces the kernels,
DSPARK_DISABLE_TRITON=1 forces the twins. OPS maps each operation to (triton_fn, twin_fn).

Drafting a block runs either markov_step once per position or draft_block (all gamma steps in one
launch); use_block_loop decides, steered by DSPARK_BLOCK_LOOP=auto|on|off.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from dspark_plugin import envs
from dspark_plugin.kernels import accept, block_loop, markov_step as step_mod, survival
from dspark_plugin.kernels._triton import HAVE_TRITON, interpreting, triton
from dspark_plugin.kernels.weights import HeadWeights  # re-exported: the core reaches kernels/ only through this module

OPS: dict[str, tuple[Callable | None, Callable]] = {
    "markov_step": (getattr(step_mod, "markov_step_triton", None), step_mod.markov_step_torch),
    "draft_block": (getattr(block_loop, "draft_block_triton", None), block_loop.draft_block_torch),
    "prefix_survival": (getattr(survival, "prefix_survival_triton", None), survival.prefix_survival_torch),
    "admit_topk": (getattr(survival, "admit_topk_triton", None), survival.admit_topk_torch),
    "accept_greedy": (getattr(accept, "accept_greedy_triton", None), accept.accept_greedy_torch),
    "accept_rejection": (getattr(accept, "accept_rejection_triton", None), accept.accept_rejection_torch),
}


@functools.lru_cache(maxsize=1)
def _gpu_driver_active() -> bool:
    if not HAVE_TRITON or not torch.cuda.is_available():
        return False
    try:
        triton.runtime.driver.active.get_current_device()
        return True
    except Exception:
        return False


def backend(*tensors: torch.Tensor) -> str:
    """'triton' or 'torch': which implementation an operation on these tensors runs."""
    if not HAVE_TRITON or envs.read(envs.DISABLE_TRITON):
        return "torch"
    if envs.read(envs.FORCE_TRITON):
        if not interpreting() and not all(t.is_cuda for t in tensors):
            raise RuntimeError("DSPARK_FORCE_TRITON=1 on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    return "triton" if all(t.is_cuda for t in tensors) and _gpu_driver_active() else "torch"


def _pick(op: str, *tensors: torch.Tensor) -> Callable:
    fast, twin = OPS[op]
    return fast if fast is not None and backend(*tensors) == "triton" else twin


def per_row(x: float | torch.Tensor, b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or [B] temperature / seed as a [B] tensor on `device`."""
    t = torch.as_tensor(x, device=device, dtype=dtype)
    return t.expand(b).contiguous() if t.dim() == 0 else t.reshape(b)


def markov_step(
    w: HeadWeights,
    base_logits: torch.Tensor,
    prev: torch.Tensor,
    h: torch.Tensor,
    state: torch.Tensor | None,
    temperature: float | torch.Tensor,
    seeds: int | torch.Tensor,
    step: int,
    top_k: int = 0,
    want_probs: bool = False,
    sample: bool | None = None,
) -> step_mod.StepResult:
    """One sequential-head step for a batch: base_logits [B, V] (U_k), prev [B] (x_{k-1}), h [B, d].

    `sample` (whether any row has temperature > 0), when the caller knows it, saves the kernel
    path a device-to-host sync per step.
    """
    b, v = base_logits.shape
    temperature = per_row(temperature, b, base_logits.device, torch.float32)
    seeds = per_row(seeds, b, base_logits.device, torch.int64)
    fn, twin = _pick("markov_step", base_logits), OPS["markov_step"][1]
    if fn is twin or (0 < top_k < v and top_k > step_mod.MAX_TOP_K):
        return twin(w, base_logits, prev, h, state, temperature, seeds, step, top_k, want_probs)
    return fn(w, base_logits, prev, h, state, temperature, seeds, step, top_k, want_probs, sample=sample)


def draft_block(
    w: HeadWeights,
    base_logits: torch.Tensor,
    h: torch.Tensor,
    anchor: torch.Tensor,
    temperature: float | torch.Tensor,
    seeds: int | torch.Tensor,
    step0: int = 0,
    top_k: int = 0,
    want_probs: bool = False,
    sample: bool | None = None,
) -> block_loop.BlockResult:
    """All gamma steps at once: base_logits [B, g, V], h [B, g, d], anchor [B] (x_0).

    `sample` as in markov_step: saves the kernel path a device-to-host sync.
    """
    b, _, v = base_logits.shape
    temperature = per_row(temperature, b, base_logits.device, torch.float32)
    seeds = per_row(seeds, b, base_logits.device, torch.int64)
    fn, twin = _pick("draft_block", base_logits), OPS["draft_block"][1]
    if fn is twin or not block_loop.fits(v, top_k):
        return twin(w, base_logits, h, anchor, temperature, seeds, step0, top_k, want_probs)
    return fn(w, base_logits, h, anchor, temperature, seeds, step0, top_k, want_probs, sample=sample)


BLOCK_LOOP_MODES = envs.VARS[envs.BLOCK_LOOP].choices  # auto, on, off


def block_loop_mode() -> str:
    """DSPARK_BLOCK_LOOP: auto (default), on or off."""
    return envs.read(envs.BLOCK_LOOP)


def _capturing_cuda_graph() -> bool:
    # CPU builds of torch raise here rather than answer False.
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AttributeError):
        return False


def use_block_loop(base_logits: torch.Tensor, top_k: int = 0) -> bool:
    """Whether to draft base_logits [B, g, V] with one draft_block launch instead of g markov_steps.

    off: never. on: always (CPU tensors then run draft_block's twin, the same function as the
    per-step twin). auto: only on CUDA tensors that the Triton kernel serves, within its limits
    (block_loop.fits, vocabulary <= block_loop.AUTO_MAX_VOCAB), and not while a CUDA graph is
    being captured: a captured per-step loop already costs no launches and splits the vocabulary
    across the GPU, which the one-program-per-row-block loop cannot.
    """
    mode = block_loop_mode()
    if mode != "auto":
        return mode == "on"
    v = base_logits.shape[-1]
    return (base_logits.is_cuda and OPS["draft_block"][0] is not None and backend(base_logits) == "triton"
            and block_loop.fits(v, top_k) and v <= block_loop.AUTO_MAX_VOCAB and not _capturing_cuda_graph())


def prefix_survival(conf: torch.Tensor) -> torch.Tensor:
    """conf [R, g] -> a [R, g] = cumulative product along g."""
    return _pick("prefix_survival", conf)(conf)


def admit_topk(survival_: torch.Tensor, budget: int) -> torch.Tensor:
    """survival [R, g], token budget K -> verify lengths [R] covering the K largest survivals
    (ties: smaller j, then smaller r, as dspark_plugin.policy.verify_planner._admission_order)."""
    fn, twin = _pick("admit_topk", survival_), OPS["admit_topk"][1]
    r, g = survival_.shape
    if r * g == 0 or r * g > survival.MAX_ADMIT_ENTRIES // 4:  # one program sorts them all
        fn = twin
    return fn(survival_, budget)


def accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor, verify_len: torch.Tensor):
    """-> (tokens [B, g+1] padded with -1, num_accepted [B]); see verify.verify_greedy."""
    return _pick("accept_greedy", draft_tokens, target_logits)(draft_tokens, target_logits, verify_len)


def accept_rejection(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    verify_len: torch.Tensor,
    u_accept: torch.Tensor,
    u_sample: torch.Tensor,
):
    """-> (tokens [B, g+1], num_accepted [B]); see verify.verify_rejection (uniforms passed in)."""
    fn = _pick("accept_rejection", draft_tokens, target_probs)
    return fn(draft_tokens, draft_probs, target_probs, verify_len, u_accept, u_sample)
