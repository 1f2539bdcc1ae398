"""Confidence-scheduled, load-aware verification (docs/algorithm.md §1.5).

Every request drafts the full block of gamma tokens; the scheduler only decides how long a prefix
of each block the target verifies this engine step. With prefix survivals a[r, j] (the predicted
probability that draft tokens 1..j of request r are all accepted) and the engine's measured steps
per second SPS(B) at a verified-token batch of B tokens, it maximises

    Theta = tau * SPS(B),   B = sum_r (1 + l_r),   tau = sum_r (1 + sum_{j <= l_r} a[r, j])

(tau = expected emitted tokens; the "1 +" is the correction / bonus token every request emits).

Admission order. All (r, j) are sorted by a descending, ties broken by smaller j (then smaller r).
Because a[r, j] is non-increasing in j, (r, j) always comes after (r, j-1), so every prefix of
the order is a set of per-request prefixes and the verify length of r is simply the number of its
entries admitted.

Why the early stop keeps decoding lossless (and the full search does not).
Rejection sampling reproduces the target only if the choice "is draft token x_k verified?" is a
stopping decision: it may use what was known before x_k was sampled, never x_k itself (if the
choice peeks at x_k, tokens the target likes less can be steered to the unverified side, where
the bonus token is redrawn from the target, and the mixture is biased). In DSpark the confidence
c_k = sigmoid(w . [h_k; W1[x_{k-1}]]) sees x_{k-1} but not x_k, so a[r, k] is a function of
x_1..x_{k-1}; a[r, k+1] = a[r, k] * c_{k+1} is the first survival that depends on x_k.
 * Early stop: the scan admits entries in order and stops at the first one that does not improve
   Theta. Whether (r, k) is admitted is decided the moment the scan reaches it, from the entries
   ranked at or before it. Those are entries of other requests (independent of r's draft) and
   (r, 1..k) (ranked before (r, k+1.. ) by the order above), i.e. functions of x_1..x_{k-1} only.
   Nothing that depends on x_k, in particular a[r, k+1], can influence it: a stopping decision.
 * Full search ("no early stop": take the admission count with the best Theta over ALL counts):
   whether (r, k) is admitted depends on Theta at counts beyond its rank, i.e. on entries ranked
   after it, including a[r, k+1], a function of x_k. Paper's counter-example: a 2-token target
   p = (0.7, 0.3), a uniform drafter, c_1 = 0.5, c_2 = 1 if x_1 = 0 else 0, and an SPS curve
   where verifying 1 token does not pay but verifying 2 does: x_1 = 0 is verified (and accepted),
   x_1 = 1 is not (its place is redrawn from the target), so token 0 is served with probability
   0.5 + 0.5 * 0.7 = 0.85. tests/core/test_scheduler_lossless.py measures exactly this.
 * Async variant: the budget K comes from survivals of an earlier step (already in the past), and
   "(r, k) is among the top K" depends only on the entries ranked before it: lossless for the same
   reason as the early stop.
What "lossless" covers here: each request's output follows the target exactly. Requests in one
batch are coupled (one request's verify length depends on another's drafts and vice versa), so
two concurrent requests' outputs can be slightly correlated with each other although each one
is exact (enumerating 2 requests with p = (0.7, 0.3), a uniform drafter, and each request's
first draft verified iff the other's first draft is 0 gives P(0, 0) = 0.5125, not 0.49, with both
marginals exactly 0.7). The paper's claim is per request, and the statistical tests count one
request per simulated engine.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Union

import torch

from dspark_plugin.errors import DSparkError
from dspark_plugin.kernels import dispatch as kernels

SPSFunction = Callable[[int], float]
SPSLike = Union[SPSFunction, "SPSCurve"]  # noqa: F821 (SPSCurve lives in dspark_plugin.policy.step_rate)

MODES = ("early_stop", "fixed", "full_search")


def prefix_survival(confidence: torch.Tensor) -> torch.Tensor:
    """a[..., j] = prod_{i <= j} c[..., i] (per-position confidences -> prefix survival).

    float32 (what the drafter emits) goes through kernels.dispatch: the Triton kernel on CUDA, its
    twin elsewhere. The kernel computes in float32, so other dtypes (float64 for analysis and
    tests) keep torch's cumprod in their own precision.
    """
    if confidence.dtype != torch.float32 or confidence.dim() == 0 or confidence.numel() == 0:
        return torch.cumprod(confidence, dim=-1)
    flat = confidence.reshape(-1, confidence.shape[-1])
    return kernels.prefix_survival(flat).reshape(confidence.shape)


def _validate(survival: torch.Tensor) -> None:
    if not isinstance(survival, torch.Tensor) or survival.dim() != 2:
        raise DSparkError(f"scheduler: survival must be a 2-D tensor [R, gamma], got {getattr(survival, 'shape', type(survival))}")
    if not bool(((survival >= 0) & (survival <= 1)).all()):  # NaN fails both comparisons
        raise DSparkError("scheduler: survival values must be finite probabilities in [0, 1]")


def _check_survival(survival: torch.Tensor) -> torch.Tensor:
    _validate(survival)
    # R * gamma values: the CPU sorts them in microseconds, and the lengths are needed on the CPU
    # (the engine's scheduler) anyway, so one device->host copy is the only sync.
    a = survival.detach().to("cpu", torch.float64)
    # Products of c <= 1 are already non-increasing; a caller passing survivals computed another
    # way (other dtype, rounding) gets them made non-increasing. cummin over j <= k only uses
    # a[:, :k+1], so this cannot leak information from later positions.
    return torch.cummin(a, dim=1).values


def _sps_table(sps: SPSLike, lo: int, hi: int) -> torch.Tensor:
    """SPS(B) for B = lo..hi as float64; vectorised when the curve offers `.table`."""
    if hasattr(sps, "table"):
        vals = torch.as_tensor(sps.table(lo, hi), dtype=torch.float64)
    else:
        vals = torch.tensor([float(sps(b)) for b in range(lo, hi + 1)], dtype=torch.float64)
    if vals.numel() != hi - lo + 1 or not torch.isfinite(vals).all() or (vals <= 0).any():
        raise DSparkError(f"scheduler: SPS must be finite and positive for B in [{lo}, {hi}]")
    return vals


def _admission_order(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and values of all (r, j) sorted by a descending, ties by smaller j then smaller r."""
    R, g = a.shape
    # Flatten j-major so that a stable descending sort breaks ties by j, then r.
    flat = a.t().reshape(-1)
    vals, idx = torch.sort(flat, descending=True, stable=True)
    rows = idx % R
    return rows, vals


def _theta_curve(vals: torch.Tensor, R: int, sps_tab: torch.Tensor) -> torch.Tensor:
    """Theta after admitting the first n entries, n = 0..len(vals)."""
    tau = R + torch.cat([vals.new_zeros(1), torch.cumsum(vals, 0)])
    return tau * sps_tab[: tau.numel()]


def _lengths(rows: torch.Tensor, n: int, R: int, device: torch.device) -> torch.Tensor:
    return torch.bincount(rows[:n], minlength=R).to(device=device, dtype=torch.long)


def _best_count(theta: torch.Tensor) -> int:
    """Admission count with the best Theta over all counts (first one on ties)."""
    best = theta.max()
    return int(torch.nonzero(theta == best)[0, 0])


def _early_stop_count(theta: torch.Tensor) -> int:
    """Admissions made before the first one that does not strictly improve Theta."""
    improves = (theta[1:] > theta[:-1]).to(torch.int64)
    return int(torch.cumprod(improves, 0).sum()) if improves.numel() else 0


def schedule_verify_lengths(
    survival: torch.Tensor,
    sps: SPSLike,
    mode: str = "early_stop",
    *,
    max_batch_tokens: int | None = None,
) -> torch.Tensor:
    """Per-request verify lengths l_r in 0..gamma (LongTensor[R], on survival's device).

    survival: [R, gamma], a[r, j] = prod_{i <= j} c[r, i] (see `prefix_survival`).
    sps: engine steps/second as a function of the verified-token batch size B (an `SPSCurve` or
        any callable int -> float); evaluated for B in [R, R * (1 + gamma)].
    mode: "early_stop" (Algorithm 1, lossless; the default), "fixed" (scheduler off: verify the
        full block) or "full_search" (best Theta over all admission counts without the early stop:
        NOT lossless, it anticipates x_k; kept only to demonstrate the bias in tests/ablations).
    max_batch_tokens: optional cap on B (e.g. the engine's token budget). Stopping on a count is
        a rank-only decision, so the cap keeps the early stop lossless.
    """
    if mode not in MODES:
        raise DSparkError(f"scheduler: unknown mode {mode!r}; expected one of {MODES}")
    a = _check_survival(survival)
    R, g = a.shape
    if mode == "fixed" or R == 0 or g == 0:
        return torch.full((R,), g if mode == "fixed" else 0, dtype=torch.long, device=survival.device)
    n_max = R * g
    if max_batch_tokens is not None:
        if max_batch_tokens < R:
            raise DSparkError(f"scheduler: max_batch_tokens={max_batch_tokens} is below the {R} tokens every request needs")
        n_max = min(n_max, max_batch_tokens - R)
    rows, vals = _admission_order(a)
    vals = vals[:n_max]
    theta = _theta_curve(vals, R, _sps_table(sps, R, R + n_max))
    n = _early_stop_count(theta) if mode == "early_stop" else _best_count(theta)
    return _lengths(rows, n, R, survival.device)


def unconstrained_budget(survival: torch.Tensor, sps: SPSLike) -> int:
    """Total draft tokens K to verify: the admission count with the best Theta over all counts.

    Not lossless if applied to the survivals of the block being verified (that is the full
    search); the async scheduler applies it to survivals from an earlier step only.
    """
    a = _check_survival(survival)
    R, g = a.shape
    if R == 0 or g == 0:
        return 0
    rows, vals = _admission_order(a)
    return _best_count(_theta_curve(vals, R, _sps_table(sps, R, R * (1 + g))))


def top_k_verify_lengths(survival: torch.Tensor, k: int) -> torch.Tensor:
    """Verify the k draft positions with the highest survival (prefix-preserving order).

    The admission order is `_admission_order`'s (a descending, ties by smaller j, then smaller r).
    float32 and narrower survivals go through kernels.dispatch.admit_topk (the Triton kernel on
    CUDA, its twin elsewhere), which ranks float32 keys in that very order. float64 survivals keep
    the exact float64 sort: rounding them to float32 could merge distinct values into ties.
    """
    _validate(survival)
    R, g = survival.shape
    k = max(0, min(int(k), R * g))
    if survival.dtype == torch.float64 or k == 0:  # k == 0 also covers an empty batch / block
        a = _check_survival(survival)
        rows, _ = _admission_order(a)
        return _lengths(rows, k, R, survival.device)
    # cummin as in _check_survival (it only looks at a[:, :j+1] for position j); "+ 0.0" turns a
    # -0.0 into +0.0, which the packed keys would otherwise rank below +0.0.
    a = survival.detach().float().cummin(dim=1).values + 0.0
    return kernels.admit_topk(a, k).to(torch.long)


class AsyncScheduler:
    """Production variant: budget from stale survivals, top-K of the fresh ones.

    In an overlapped engine the CPU plans step t before the drafter of step t-1 has finished, so
    the token budget K is computed (unconstrained search) from the survivals seen `lag` calls ago
    (default 2), and only the cheap top-K selection uses the fresh survivals. Until `lag` steps
    have been seen it falls back to the synchronous early-stop algorithm (never to a search on
    fresh survivals, which would anticipate x_k). Call `schedule` once per engine step, in order.
    """

    def __init__(self, sps: SPSLike, lag: int = 2, max_batch_tokens: int | None = None):
        if lag < 1:
            raise DSparkError("AsyncScheduler: lag must be >= 1 (a budget from the fresh survivals is the biased full search)")
        self.sps = sps
        self.lag = lag
        self.max_batch_tokens = max_batch_tokens
        self._budgets: deque[int] = deque(maxlen=lag)
        self.last_budget: int | None = None

    def reset(self) -> None:
        self._budgets.clear()
        self.last_budget = None

    def schedule(self, survival: torch.Tensor) -> torch.Tensor:
        """Verify lengths for this step (LongTensor[R]); remembers this step's budget for later."""
        a = _check_survival(survival)
        R = a.shape[0]
        if len(self._budgets) == self.lag:
            k = self._budgets[0]
            if self.max_batch_tokens is not None:
                k = min(k, max(0, self.max_batch_tokens - R))
            lengths = top_k_verify_lengths(survival, k)
        else:
            k = None
            lengths = schedule_verify_lengths(survival, self.sps, "early_stop", max_batch_tokens=self.max_batch_tokens)
        self.last_budget = k
        # The budget for step t + lag only needs this step's survivals; computing it now keeps the
        # state to one integer per pending step.
        self._budgets.append(unconstrained_budget(survival, self.sps))
        return lengths


def verify_len_fn(sps: SPSLike, mode: str = "early_stop") -> Callable[[object, int], int]:
    """Adapter for `runner.ReferenceRunner(verify_len_fn=...)` (batch 1): block -> verify length.

    Works with any draft block exposing `.survival` [1, gamma]; blocks without confidences verify
    the full `gamma`.
    """
    def fn(block, gamma: int) -> int:
        survival = getattr(block, "survival", None)
        if survival is None or mode == "fixed":
            return gamma
        return int(schedule_verify_lengths(survival[:, :gamma], sps, mode)[0])

    return fn
