"""dispatch: the table of (Triton kernel, twin) per operation and the backend choice."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests run in a TRITON_INTERPRET=1 subprocess from tests/test_kernels.py",
                allow_module_level=True)

from dspark_plugin.kernels import accept, block_loop, dispatch, markov_step, survival  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_dispatch_table_names_the_kernels_and_twins():
    assert dispatch.OPS == {
        "markov_step": (markov_step.markov_step_triton, markov_step.markov_step_torch),
        "draft_block": (block_loop.draft_block_triton, block_loop.draft_block_torch),
        "prefix_survival": (survival.prefix_survival_triton, survival.prefix_survival_torch),
        "admit_topk": (survival.admit_topk_triton, survival.admit_topk_torch),
        "accept_greedy": (accept.accept_greedy_triton, accept.accept_greedy_torch),
        "accept_rejection": (accept.accept_rejection_triton, accept.accept_rejection_torch),
    }
    for name, (fast, twin) in dispatch.OPS.items():
        assert callable(fast) and callable(twin) and fast is not twin
        assert callable(getattr(dispatch, name))


def test_backend_choice(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("DSPARK_FORCE_TRITON", raising=False)
    assert dispatch.backend(x) == "torch"  # CPU tensors take the twin
    monkeypatch.setenv("DSPARK_FORCE_TRITON", "1")
    assert dispatch.backend(x) == "triton"
    monkeypatch.setenv("DSPARK_DISABLE_TRITON", "1")
    assert dispatch.backend(x) == "torch"
    monkeypatch.delenv("DSPARK_DISABLE_TRITON")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.backend(x)


def _run_all_ops():
    from test_kernels_step import make_weights

    b, g, v, r = 2, 3, 70, 16
    gen = torch.Generator().manual_seed(0)
    w = make_weights("vanilla", v, r)
    base = torch.randn(b, g, v, generator=gen)
    h = torch.randn(b, g, 24, generator=gen)
    anchor = torch.tensor([1, 2])
    step = dispatch.markov_step(w, base[:, 0], anchor, h[:, 0], None, 0.8, torch.tensor([5, 6]), 0, 0, True)
    blk = dispatch.draft_block(w, base, h, anchor, 0.8, torch.tensor([5, 6]), 0, 0, True)
    assert torch.equal(step.token, blk.tokens[:, 0])
    a = dispatch.prefix_survival(torch.sigmoid(blk.conf_logits))
    lens = dispatch.admit_topk(a, 4)
    assert int(lens.sum()) == 4
    target_logits = torch.randn(b, g + 1, v, generator=gen)
    tok_g, n_g = dispatch.accept_greedy(blk.tokens, target_logits, lens)
    tok_r, n_r = dispatch.accept_rejection(blk.tokens, blk.probs, torch.softmax(target_logits, -1), lens,
                                           torch.rand(b, g, generator=gen), torch.rand(b, generator=gen))
    return step.token, blk.tokens, blk.probs, a, lens, tok_g, n_g, tok_r, n_r


def test_every_operation_through_dispatch(monkeypatch):
    """Each dispatch entry point runs end to end on both backends, and the backends agree."""
    calls = []
    for name, (fast, twin) in list(dispatch.OPS.items()):
        counted = lambda *a, _f=fast, _n=name, **kw: calls.append(_n) or _f(*a, **kw)  # noqa: E731
        monkeypatch.setitem(dispatch.OPS, name, (counted, twin))
    monkeypatch.setenv("DSPARK_FORCE_TRITON", "0")
    twin_out = _run_all_ops()
    assert calls == []
    monkeypatch.setenv("DSPARK_FORCE_TRITON", "1")
    kern_out = _run_all_ops()
    assert sorted(set(calls)) == sorted(dispatch.OPS)
    for x, y in zip(kern_out, twin_out):
        assert torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6)
