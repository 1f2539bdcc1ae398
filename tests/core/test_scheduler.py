"""Scheduler unit tests: Algorithm 1 against a literal one-at-a-time implementation, the stopping
property that makes it lossless, the async variant, fixed block, and input errors."""
from __future__ import annotations

import pytest
import torch

from dspark_plugin.errors import DSparkError
from dspark_plugin.policy.verify_planner import (
    AsyncScheduler,
    prefix_survival,
    schedule_verify_lengths,
    top_k_verify_lengths,
    unconstrained_budget,
)
from dspark_plugin.policy.step_rate import SPSCurve


pytestmark = pytest.mark.usefixtures("one_thread")


def literal_algorithm_1(a: torch.Tensor, sps, early_stop: bool = True) -> list[int]:
    """docs/algorithm.md §1.5 written as a plain loop (the reference the vectorised code must match)."""
    R, g = a.shape
    entries = sorted(((a[r, j].item(), j, r) for r in range(R) for j in range(g)), key=lambda e: (-e[0], e[1], e[2]))
    lengths = [0] * R
    tau, B = float(R), R
    best, best_lengths = tau * sps(B), list(lengths)
    for val, j, r in entries:
        assert lengths[r] == j, "admission order must preserve prefixes"
        lengths[r] += 1
        tau, B = tau + val, B + 1
        theta = tau * sps(B)
        if theta > best:
            best, best_lengths = theta, list(lengths)
        elif early_stop:
            break
    return best_lengths


def random_case(gen: torch.Generator, R: int, g: int):
    conf = torch.rand(R, g, generator=gen) ** 0.3
    conf[torch.rand(R, g, generator=gen) < 0.1] = 1.0  # exact ties inside a request
    a = prefix_survival(conf.double())
    cost = torch.rand(3, generator=gen).tolist()
    knee = int(torch.randint(1, 2 * R + 2, (1,), generator=gen))
    steps = int(torch.randint(1, 5, (1,), generator=gen))

    def sps(b: int) -> float:  # a staircase with a flat start: the shape where the two searches differ
        return 1.0 / (1.0 + cost[0] * max(0, b - knee) * 0.05 + cost[1] * (max(0, b - knee) // steps))

    return a, sps


@pytest.mark.parametrize("seed", range(40))
def test_matches_literal_algorithm(seed):
    gen = torch.Generator().manual_seed(seed)
    R, g = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 8, (1,), generator=gen))
    a, sps = random_case(gen, R, g)
    assert schedule_verify_lengths(a, sps).tolist() == literal_algorithm_1(a, sps, early_stop=True)
    assert schedule_verify_lengths(a, sps, "full_search").tolist() == literal_algorithm_1(a, sps, early_stop=False)


def test_full_search_and_early_stop_differ_somewhere():
    # The property tests below would be vacuous if the two never disagreed.
    differ = 0
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        a, sps = random_case(gen, 4, 5)
        differ += schedule_verify_lengths(a, sps).tolist() != schedule_verify_lengths(a, sps, "full_search").tolist()
    assert differ > 5


def decision_ignores_the_future(schedule, a: torch.Tensor, gen: torch.Generator) -> bool:
    """Is "verify position i of request r" unchanged when a[r, i+1:] (which depends on x_{i+1},
    the token being decided on) is redrawn? That is the stopping property losslessness needs."""
    base = schedule(a)
    R, g = a.shape
    for r in range(R):
        for i in range(g - 1):
            for _ in range(3):
                b = a.clone()
                tail = torch.rand(g - i - 1, generator=gen, dtype=a.dtype).cumprod(0) * a[r, i]
                b[r, i + 1:] = tail
                if bool(schedule(b)[r] > i) != bool(base[r] > i):
                    return False
    return True


def test_early_stop_and_top_k_are_stopping_decisions():
    gen = torch.Generator().manual_seed(7)
    for seed in range(25):
        a, sps = random_case(torch.Generator().manual_seed(seed), 3, 4)
        assert decision_ignores_the_future(lambda s: schedule_verify_lengths(s, sps), a, gen)
        k = int(torch.randint(0, 13, (1,), generator=gen))
        assert decision_ignores_the_future(lambda s: top_k_verify_lengths(s, k), a, gen)


def test_full_search_is_not_a_stopping_decision():
    # The paper's counter-example: whether x_1 is verified depends on a_2, i.e. on x_1.
    sps = {1: 1.0, 2: 0.6, 3: 0.55}.__getitem__
    a = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    assert not decision_ignores_the_future(lambda s: schedule_verify_lengths(s, sps, "full_search"), a,
                                           torch.Generator().manual_seed(0))
    assert decision_ignores_the_future(lambda s: schedule_verify_lengths(s, sps), a, torch.Generator().manual_seed(0))


def test_ties_and_prefixes():
    a = torch.tensor([[0.8, 0.8, 0.8], [0.8, 0.4, 0.0]])
    # Flat SPS: every entry with a > 0 improves Theta; a = 0 never does.
    assert schedule_verify_lengths(a, lambda b: 1.0).tolist() == [3, 2]
    # Budget of 3 over four tied 0.8s: smaller j first, then smaller r.
    assert top_k_verify_lengths(a, 3).tolist() == [2, 1]
    assert top_k_verify_lengths(a, 100).tolist() == [3, 3]
    assert top_k_verify_lengths(a, 0).tolist() == [0, 0]


@pytest.mark.parametrize("seed", range(6))
def test_top_k_float32_through_dispatch_matches_float64_order(seed):
    """float32 survivals go through kernels.dispatch.admit_topk (its twin on CPU); float64 keep the
    exact sort. Both must admit the same prefixes, ties across and within rows included."""
    gen = torch.Generator().manual_seed(seed)
    R, g = int(torch.randint(2, 9, (1,), generator=gen)), int(torch.randint(1, 8, (1,), generator=gen))
    conf = (torch.randint(1, 5, (R, g), generator=gen) / 4).float()  # few distinct values: many ties
    a = prefix_survival(conf)
    assert a.dtype == torch.float32
    for k in range(R * g + 2):
        assert top_k_verify_lengths(a, k).tolist() == top_k_verify_lengths(a.double(), k).tolist()


def test_load_shrinks_verification():
    a = prefix_survival(torch.full((16, 7), 0.8))
    light = schedule_verify_lengths(a[:1], lambda b: 1.0 / (1.0 + 0.02 * b))
    heavy = schedule_verify_lengths(a, lambda b: 1.0 / (1.0 + 0.02 * b))
    assert light.item() > heavy.float().mean().item() > 0
    assert (schedule_verify_lengths(a, lambda b: 1.0 / b) == 0).all()  # every token costs a step


def test_fixed_mode_verifies_full_block():
    a = prefix_survival(torch.rand(5, 6))
    out = schedule_verify_lengths(a, lambda b: 1.0 / b, mode="fixed")
    assert out.dtype == torch.long and out.tolist() == [6] * 5


def test_sps_curve_and_callable_agree():
    curve = SPSCurve.from_measurements([1, 4, 16, 64], [50.0, 45.0, 30.0, 10.0])
    gen = torch.Generator().manual_seed(3)
    a = prefix_survival(torch.rand(12, 7, generator=gen) ** 0.2)
    assert schedule_verify_lengths(a, curve).tolist() == schedule_verify_lengths(a, lambda b: curve(b)).tolist()
    assert schedule_verify_lengths(a, curve).tolist() == literal_algorithm_1(a.double(), curve)


def test_max_batch_tokens_caps_b():
    a = prefix_survival(torch.full((4, 7), 0.95))
    out = schedule_verify_lengths(a, lambda b: 1.0, max_batch_tokens=10)
    assert int(out.sum()) + 4 == 10
    with pytest.raises(DSparkError, match="max_batch_tokens"):
        schedule_verify_lengths(a, lambda b: 1.0, max_batch_tokens=3)


def test_async_budget_comes_from_two_steps_ago():
    sps = lambda b: 1.0 / (1.0 + 0.05 * b)  # noqa: E731
    gen = torch.Generator().manual_seed(5)
    steps = [prefix_survival(torch.rand(6, 5, generator=gen) ** 0.3) for _ in range(5)]
    sched = AsyncScheduler(sps)
    outs = [sched.schedule(a) for a in steps]
    # No history yet: the synchronous early stop (never a search on fresh survivals).
    for t in range(2):
        assert outs[t].tolist() == schedule_verify_lengths(steps[t], sps).tolist()
    for t in range(2, 5):
        k = unconstrained_budget(steps[t - 2], sps)
        assert sched.last_budget is not None
        assert int(outs[t].sum()) == k
        assert outs[t].tolist() == top_k_verify_lengths(steps[t], k).tolist()
    sched.reset()
    assert sched.schedule(steps[0]).tolist() == outs[0].tolist()
    with pytest.raises(DSparkError, match="lag"):
        AsyncScheduler(sps, lag=0)


def test_async_handles_changing_batch():
    sched = AsyncScheduler(lambda b: 1.0)
    for r in (4, 1, 3, 0, 2):
        out = sched.schedule(prefix_survival(torch.full((r, 3), 0.9)))
        assert out.shape == (r,) and (out >= 0).all() and (out <= 3).all()


def test_empty_and_zero_gamma():
    assert schedule_verify_lengths(torch.zeros(0, 7), lambda b: 1.0).shape == (0,)
    assert schedule_verify_lengths(torch.zeros(3, 0), lambda b: 1.0).tolist() == [0, 0, 0]


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([0.5, 0.4]), "2-D"),
    (torch.tensor([[0.5, float("nan")]]), "finite probabilities"),
    (torch.tensor([[1.5, 0.4]]), "finite probabilities"),
])
def test_bad_survival(bad, match):
    with pytest.raises(DSparkError, match=match):
        schedule_verify_lengths(bad, lambda b: 1.0)


def test_bad_mode_and_sps():
    a = torch.full((2, 3), 0.5)
    with pytest.raises(DSparkError, match="unknown mode"):
        schedule_verify_lengths(a, lambda b: 1.0, mode="greedy")
    with pytest.raises(DSparkError, match="SPS must be finite and positive"):
        schedule_verify_lengths(a, lambda b: 0.0)


def test_non_monotone_survival_is_made_monotone():
    # Survivals from another dtype may wiggle upward; the scheduler must still emit prefixes.
    a = torch.tensor([[0.5, 0.50001, 0.2]])
    assert schedule_verify_lengths(a, lambda b: 1.0).tolist() == [3]
