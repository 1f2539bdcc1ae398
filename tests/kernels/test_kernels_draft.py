"""The drafting loop built from the kernels reproduces the core's `sequential_draft` block, and the
core's per-step operation goes through dispatch (Triton when forced, the twin otherwise)."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests run in a TRITON_INTERPRET=1 subprocess from tests/kernels/test_kernels.py",
                allow_module_level=True)

from test_kernels_rng import poisoned  # noqa: E402,F401
from tiny import tiny_drafter, tiny_target  # noqa: E402

from dspark_plugin.decode.draft import sequential_draft  # noqa: E402
from dspark_plugin.kernels import dispatch  # noqa: E402
from dspark_plugin.kernels.block_loop import draft_block_torch, draft_block_triton  # noqa: E402
from dspark_plugin.kernels.markov_step import markov_step_triton  # noqa: E402
from dspark_plugin.kernels.weights import HeadWeights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=3)


def _inputs(drafter, b, seed):
    gen = torch.Generator().manual_seed(seed)
    g, d = drafter.num_drafts, drafter.cfg.hidden_size
    h = torch.randn(b, g, d, generator=gen)
    anchor = torch.randint(0, drafter.cfg.vocab_size, (b,), generator=gen)
    return h, anchor


def _reference(drafter, h, anchor, **kw):
    """The core's loop with Triton switched off (on CPU: the twin for greedy)."""
    old = os.environ.get("DSPARK_DISABLE_TRITON")
    os.environ["DSPARK_DISABLE_TRITON"] = "1"
    try:
        return sequential_draft(drafter, h, anchor, **kw)
    finally:
        if old is None:
            del os.environ["DSPARK_DISABLE_TRITON"]
        else:
            os.environ["DSPARK_DISABLE_TRITON"] = old


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_kernel_loop_equals_core_greedy_block(poisoned, target, head):
    drafter = tiny_drafter(target, head, seed=5, block_size=5)
    drafter.confidence_temperatures = torch.tensor([1.0, 1.5, 2.0, 0.7, 1.2])
    b = 3
    h, anchor = _inputs(drafter, b, seed=7)
    with torch.no_grad():
        ref = _reference(drafter, h, anchor, temperature=0.0)
        w = HeadWeights.from_drafter(drafter)
        base = drafter.lm_head(h).float()
        temps, seeds = torch.zeros(b), torch.zeros(b, dtype=torch.int64)
        state = drafter.markov_head.init_state(h[:, 0])
        prev, toks, confs = anchor, [], []
        for k in range(drafter.num_drafts):  # the per-step kernel, chained
            s = markov_step_triton(w, base[:, k], prev, h[:, k], state, temps, seeds, k)
            prev, state = s.token, s.state
            toks.append(s.token)
            confs.append(s.conf_logit)
        blk = draft_block_triton(w, base, h, anchor, temps, seeds)  # the one-launch block
    conf = torch.sigmoid(torch.stack(confs, 1) / drafter.confidence_temperatures)
    assert torch.equal(torch.stack(toks, 1), ref.tokens)
    assert torch.equal(blk.tokens, ref.tokens)
    torch.testing.assert_close(conf, ref.confidence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.sigmoid(blk.conf_logits / drafter.confidence_temperatures), ref.confidence,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_core_sequential_draft_runs_the_kernel_when_forced(target, head, monkeypatch):
    """sequential_draft -> dispatch.markov_step: forcing Triton gives the twin's block, greedy and sampled."""
    drafter = tiny_drafter(target, head, seed=2, block_size=4)
    h, anchor = _inputs(drafter, 2, seed=11)
    calls = []
    fast, twin = dispatch.OPS["markov_step"]
    monkeypatch.setitem(dispatch.OPS, "markov_step", (lambda *a, **kw: calls.append(1) or fast(*a, **kw), twin))
    w = HeadWeights.from_drafter(drafter)
    with torch.no_grad():
        base = drafter.lm_head(h).float()
        for kw in [dict(temperature=0.0), dict(temperature=0.9, top_k=0), dict(temperature=1.1, top_k=7)]:
            core_block = sequential_draft(drafter, h, anchor, generator=torch.Generator().manual_seed(3), **kw)
            assert not calls  # CPU tensors: the twin (greedy) or the core's own sampling loop
            monkeypatch.setenv("DSPARK_FORCE_TRITON", "1")
            kern_block = sequential_draft(drafter, h, anchor, generator=torch.Generator().manual_seed(3), **kw)
            monkeypatch.delenv("DSPARK_FORCE_TRITON")
            assert len(calls) == drafter.num_drafts
            calls.clear()
            # the kernel path keys its Gumbel noise by one seed per request drawn from the generator
            seeds = torch.randint(0, 2**32, (2,), generator=torch.Generator().manual_seed(3))
            twin_block = draft_block_torch(w, base, h, anchor, torch.full((2,), kw["temperature"]), seeds, 0,
                                           kw.get("top_k", 0), kw["temperature"] > 0)
            assert torch.equal(kern_block.tokens, twin_block.tokens)
            assert drafter.confidence_temperatures is None
            torch.testing.assert_close(kern_block.confidence, torch.sigmoid(twin_block.conf_logits),
                                       rtol=1e-5, atol=1e-6)
            if kw["temperature"] == 0:
                assert torch.equal(kern_block.tokens, core_block.tokens)
                torch.testing.assert_close(kern_block.confidence, core_block.confidence, rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(kern_block.probs, twin_block.probs, rtol=1e-5, atol=1e-6)
                # same distributions as the core's loop (which samples its own tokens)
                torch.testing.assert_close(kern_block.probs[:, 0], core_block.probs[:, 0], rtol=1e-5, atol=1e-6)
                # each token was drawn where its own draft distribution has mass (top-k respected)
                p_tok = kern_block.probs.gather(2, kern_block.tokens[..., None]).squeeze(2)
                assert bool((p_tok > 0).all())
                if kw.get("top_k"):
                    assert bool(((kern_block.probs > 0).sum(-1) <= kw["top_k"]).all())
            assert bool(kern_block.ok.all())


def test_core_greedy_unchanged_by_the_dispatch(target):
    """The twin that now serves CPU drafting reproduces the pre-kernel loop exactly (greedy)."""
    drafter = tiny_drafter(target, "gated", seed=4, block_size=6)
    h, anchor = _inputs(drafter, 4, seed=2)
    with torch.no_grad():
        new = sequential_draft(drafter, h, anchor, temperature=0.0)
        # the pre-kernel loop, spelled out
        base = drafter.lm_head(h).float()
        prev, toks, confs = anchor, [], []
        for k in range(drafter.num_drafts):
            bias, _, w1_prev = drafter.markov_head.step(prev, h[:, k], None)
            prev = (base[:, k] + bias.float()).argmax(-1)
            toks.append(prev)
            confs.append(drafter.confidence_head.logit(h[:, k], w1_prev).float())
    assert torch.equal(new.tokens, torch.stack(toks, 1))
    assert torch.equal(new.confidence, torch.sigmoid(torch.stack(confs, 1)))


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
@pytest.mark.parametrize("force", ["1", "0"])
def test_block_loop_path_equals_per_step_path(target, head, force, monkeypatch):
    """DSPARK_BLOCK_LOOP=on (one draft_block per block) and =off (one markov_step per position)
    draft the same block: the kernels when forced, the twins otherwise; greedy and sampled."""
    drafter = tiny_drafter(target, head, seed=6, block_size=4)
    drafter.confidence_temperatures = torch.tensor([1.0, 1.5, 0.8, 1.2])
    h, anchor = _inputs(drafter, 3, seed=13)
    calls = []
    for name in ("markov_step", "draft_block"):
        fast, twin = dispatch.OPS[name]
        monkeypatch.setitem(dispatch.OPS, name, (
            lambda *a, _f=fast, _n=name, **kw: calls.append(_n) or _f(*a, **kw),
            lambda *a, _f=twin, _n=name + "_twin", **kw: calls.append(_n) or _f(*a, **kw)))
    monkeypatch.setenv("DSPARK_FORCE_TRITON", force)
    suffix = "" if force == "1" else "_twin"
    cases = [dict(temperature=0.0), dict(temperature=0.9), dict(temperature=1.1, top_k=7)]
    if force == "0":
        cases = cases[:1]  # CPU sampling without the kernels keeps the modules' own loop
    with torch.no_grad():
        for kw in cases:
            out = {}
            for mode in ("on", "off"):
                monkeypatch.setenv("DSPARK_BLOCK_LOOP", mode)
                calls.clear()
                out[mode] = sequential_draft(drafter, h, anchor, generator=torch.Generator().manual_seed(4), **kw)
                want = ["draft_block" + suffix] if mode == "on" else ["markov_step" + suffix] * drafter.num_drafts
                assert calls == want, (mode, kw)
            on, off = out["on"], out["off"]
            assert torch.equal(on.tokens, off.tokens) and torch.equal(on.ok, off.ok)
            assert on.tokens.dtype == off.tokens.dtype
            assert torch.equal(on.confidence, off.confidence)
            if kw["temperature"] > 0:
                assert torch.equal(on.probs, off.probs)
            else:
                assert on.probs is None and off.probs is None
