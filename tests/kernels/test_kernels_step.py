"""Fused sequential-head step (vanilla / gated / RNN) under TRITON_INTERPRET=1 vs its PyTorch twin."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests run in a TRITON_INTERPRET=1 subprocess from tests/kernels/test_kernels.py",
                allow_module_level=True)

from test_kernels_rng import poisoned  # noqa: E402,F401 (fixture)

# Masked-out rows make the interpreter's numpy log/argmax warn; results there are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

D = 24


def make_weights(kind: str, v: int, r: int, conf: bool = True, conf_markov: bool = True, seed: int = 0):
    from dspark_plugin.kernels.weights import HeadWeights

    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    proj_w = proj_b = None
    if kind == "gated":
        proj_w, proj_b = rn(r, D + r) * 0.2, rn(r) * 0.1
    if kind == "rnn":
        proj_w, proj_b = rn(3 * r, 2 * r + D) * 0.2, rn(3 * r) * 0.1
    cw = rn(1, D + (r if conf_markov else 0)) if conf else None
    cb = rn(1) if conf else None
    return HeadWeights(kind, rn(v, r), rn(v, r) * 0.5, proj_w, proj_b, cw, cb, conf_markov)


def make_inputs(b: int, v: int, r: int, kind: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, v, generator=g) * 2
    prev = torch.randint(0, v, (b,), generator=g)
    h = torch.randn(b, D, generator=g)
    state = torch.randn(b, r, generator=g) if kind == "rnn" else None
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.arange(b) % 4]
    seeds = torch.randint(0, 2**40, (b,), generator=g)
    return base, prev, h, state, temp, seeds


def check_step(a, b, v, kind, want_probs, has_conf=True):
    assert a.token.dtype == torch.int64 and bool(((a.token >= 0) & (a.token < v)).all())
    assert torch.equal(a.token, b.token)
    assert bool(torch.isfinite(a.logprob).all())
    torch.testing.assert_close(a.logprob, b.logprob, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.finite, b.finite)
    if has_conf:
        torch.testing.assert_close(a.conf_logit, b.conf_logit, rtol=1e-5, atol=1e-5)
    else:
        assert a.conf_logit is None and b.conf_logit is None
    if kind == "rnn":
        torch.testing.assert_close(a.state, b.state, rtol=1e-5, atol=1e-5)
    if want_probs:
        assert bool(torch.isfinite(a.probs).all())
        torch.testing.assert_close(a.probs, b.probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.probs.sum(-1), torch.ones(a.probs.shape[0]), rtol=0, atol=1e-5)


# (B, V, r, top_k, nsplit, block_v): non-power-of-two V, B = 1, several splits and tiles, a partial last tile
SHAPES = [
    (1, 257, 16, 0, 1, 1024),
    (1, 1000, 32, 0, 4, 128),
    (5, 333, 16, 0, 2, 64),
    (18, 97, 24, 0, 2, 32),
    (3, 150, 16, 5, 2, 64),
    (2, 77, 16, 1, 1, 128),
]


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("b,v,r,top_k,nsplit,block_v", SHAPES)
def test_step_matches_twin(poisoned, kind, b, v, r, top_k, nsplit, block_v):
    from dspark_plugin.kernels.markov_step import markov_step_torch, markov_step_triton

    w = make_weights(kind, v, r, seed=b * 7 + v)
    base, prev, h, state, temp, seeds = make_inputs(b, v, r, kind, seed=v)
    a = markov_step_triton(w, base, prev, h, state, temp, seeds, 3, top_k, True, nsplit=nsplit, block_v=block_v)
    t = markov_step_torch(w, base, prev, h, state, temp, seeds, 3, top_k, True)
    check_step(a, t, v, kind, True)


@pytest.mark.parametrize("ticket", [True, False])
def test_step_greedy_only_two_launch_and_no_confidence(poisoned, ticket):
    from dspark_plugin.kernels.markov_step import markov_step_torch, markov_step_triton

    b, v, r = 4, 301, 16
    w = make_weights("vanilla", v, r, conf=False)
    base, prev, h, _, _, seeds = make_inputs(b, v, r, "vanilla")
    temp = torch.zeros(b)
    a = markov_step_triton(w, base, prev, h, None, temp, seeds, 0, 0, False, nsplit=4, block_v=64, ticket=ticket)
    t = markov_step_torch(w, base, prev, h, None, temp, seeds, 0, 0, False)
    check_step(a, t, v, "vanilla", False, has_conf=False)
    assert torch.equal(a.token, (base + h.new_zeros(1) + torch.nn.functional.embedding(prev, w.w1) @ w.w2.T).argmax(-1))
    assert bool((a.logprob == 0).all())


def test_confidence_without_markov_input(poisoned):
    from dspark_plugin.kernels.markov_step import markov_step_torch, markov_step_triton

    b, v, r = 3, 120, 16
    w = make_weights("gated", v, r, conf_markov=False)
    base, prev, h, _, temp, seeds = make_inputs(b, v, r, "gated")
    a = markov_step_triton(w, base, prev, h, None, temp, seeds, 2, 0, False)
    t = markov_step_torch(w, base, prev, h, None, temp, seeds, 2, 0, False)
    check_step(a, t, v, "gated", False)


def test_sampled_tokens_follow_seeds_and_steps(poisoned):
    """Same seed and step -> same token; another step -> an independent draw (mostly different)."""
    from dspark_plugin.kernels.markov_step import markov_step_torch, markov_step_triton

    b, v, r = 16, 64, 16
    w = make_weights("vanilla", v, r, conf=False)
    base = torch.zeros(b, v)  # flat logits: the bias alone decides, sampling has many options
    prev = torch.zeros(b, dtype=torch.int64)
    h = torch.zeros(b, D)
    temp = torch.full((b,), 5.0)
    seeds = torch.arange(b)
    a1 = markov_step_triton(w, base, prev, h, None, temp, seeds, 1)
    a2 = markov_step_triton(w, base, prev, h, None, temp, seeds, 2)
    t2 = markov_step_torch(w, base, prev, h, None, temp, seeds, 2)
    assert torch.equal(a2.token, t2.token)
    assert int((a1.token != a2.token).sum()) >= b // 2
    assert len(set(a1.token.tolist())) >= b // 2  # rows with the same logits but different seeds differ


def test_nonfinite_row_is_reported(poisoned):
    from dspark_plugin.kernels.markov_step import markov_step_torch, markov_step_triton

    b, v, r = 3, 90, 16
    w = make_weights("vanilla", v, r)
    base, prev, h, _, temp, seeds = make_inputs(b, v, r, "vanilla")
    base[1, 40] = float("nan")
    a = markov_step_triton(w, base, prev, h, None, temp, seeds, 0, nsplit=2, block_v=32)
    t = markov_step_torch(w, base, prev, h, None, temp, seeds, 0)
    assert a.finite.tolist() == [True, False, True] == t.finite.tolist()
