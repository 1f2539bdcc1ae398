"""Whole-block drafting kernel (all gamma steps in one launch) vs its twin and vs per-step kernels."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests run in a TRITON_INTERPRET=1 subprocess from tests/kernels/test_kernels.py",
                allow_module_level=True)

from test_kernels_rng import poisoned  # noqa: E402,F401
from test_kernels_step import D, make_weights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("b,v,g,top_k,block_v", [(1, 211, 3, 0, 1024), (5, 333, 4, 0, 128), (3, 150, 2, 4, 64)])
def test_block_matches_twin_and_steps(poisoned, kind, b, v, g, top_k, block_v):
    from dspark_plugin.kernels.block_loop import draft_block_torch, draft_block_triton
    from dspark_plugin.kernels.markov_step import markov_step_triton

    r = 16
    w = make_weights(kind, v, r, seed=v + g)
    gen = torch.Generator().manual_seed(b + v)
    base = torch.randn(b, g, v, generator=gen) * 2
    h = torch.randn(b, g, D, generator=gen)
    anchor = torch.randint(0, v, (b,), generator=gen)
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.arange(b) % 4]
    seeds = torch.randint(0, 2**40, (b,), generator=gen)
    a = draft_block_triton(w, base, h, anchor, temp, seeds, 11, top_k, True, block_v=block_v)
    t = draft_block_torch(w, base, h, anchor, temp, seeds, 11, top_k, True)
    assert bool(((a.tokens >= 0) & (a.tokens < v)).all())
    assert torch.equal(a.tokens, t.tokens)
    torch.testing.assert_close(a.logprobs, t.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.conf_logits, t.conf_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.probs, t.probs, rtol=1e-5, atol=1e-6)
    assert bool(a.finite.all()) and bool(t.finite.all())

    # the per-step kernel chained by hand draws the same block
    state = torch.zeros(b, r) if kind == "rnn" else None
    prev = anchor
    for k in range(g):
        s = markov_step_triton(w, base[:, k], prev, h[:, k], state, temp, seeds, 11 + k, top_k, False)
        assert torch.equal(s.token, a.tokens[:, k])
        prev, state = s.token, s.state
