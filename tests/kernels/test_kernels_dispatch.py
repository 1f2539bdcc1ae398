"""dispatch: the table of (Triton kernel, twin) per operation and the backend choice."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests run in a TRITON_INTERPRET=1 subprocess from tests/kernels/test_kernels.py",
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


class _CudaLooking:
    """Stands in for a CUDA tensor: dispatch only asks `is_cuda` (and `shape` for the block loop)."""

    is_cuda = True

    def __init__(self, *shape: int):
        self.shape = shape


def test_selection_for_cuda_looking_and_cpu_tensors(monkeypatch):
    """CUDA tensors (with a live driver) get every Triton kernel, CPU tensors every twin."""
    monkeypatch.delenv("DSPARK_FORCE_TRITON", raising=False)
    monkeypatch.delenv("DSPARK_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(dispatch, "_gpu_driver_active", lambda: True)
    cuda, cpu = _CudaLooking(2, 3), torch.zeros(2, 3)
    for name, (fast, twin) in dispatch.OPS.items():
        assert dispatch._pick(name, cuda) is fast, name
        assert dispatch._pick(name, cpu) is twin, name
        assert dispatch._pick(name, cuda, cpu) is twin, name  # mixed devices: never the kernel
    monkeypatch.setattr(dispatch, "_gpu_driver_active", lambda: False)
    assert all(dispatch._pick(name, cuda) is twin for name, (_, twin) in dispatch.OPS.items())


def test_block_loop_selection(monkeypatch):
    """auto: one draft_block launch only for CUDA tensors the kernel serves, within its limits and
    outside CUDA graph capture; on / off override; anything else is an error."""
    monkeypatch.delenv("DSPARK_FORCE_TRITON", raising=False)
    monkeypatch.delenv("DSPARK_BLOCK_LOOP", raising=False)
    monkeypatch.setattr(dispatch, "_gpu_driver_active", lambda: True)
    small, big = _CudaLooking(4, 7, 4096), _CudaLooking(4, 7, block_loop.AUTO_MAX_VOCAB + 1)
    cpu = torch.zeros(4, 7, 4096)
    assert dispatch.block_loop_mode() == "auto"
    assert dispatch.use_block_loop(small)
    assert dispatch.use_block_loop(small, top_k=markov_step.MAX_TOP_K)
    assert not dispatch.use_block_loop(small, top_k=markov_step.MAX_TOP_K + 1)
    assert not dispatch.use_block_loop(big)
    assert not dispatch.use_block_loop(cpu)
    monkeypatch.setenv("DSPARK_FORCE_TRITON", "1")
    assert not dispatch.use_block_loop(cpu)  # the interpreter keeps the per-step loop under auto
    monkeypatch.delenv("DSPARK_FORCE_TRITON")
    monkeypatch.setattr(dispatch, "_capturing_cuda_graph", lambda: True)
    assert not dispatch.use_block_loop(small)
    monkeypatch.setenv("DSPARK_BLOCK_LOOP", "on")
    assert dispatch.use_block_loop(small) and dispatch.use_block_loop(cpu) and dispatch.use_block_loop(big)
    monkeypatch.setenv("DSPARK_BLOCK_LOOP", "off")
    assert not dispatch.use_block_loop(small) and not dispatch.use_block_loop(cpu)
    monkeypatch.setenv("DSPARK_BLOCK_LOOP", "sometimes")
    with pytest.raises(ValueError, match="DSPARK_BLOCK_LOOP"):
        dispatch.use_block_loop(small)


def test_core_verify_and_scheduler_route_through_dispatch(monkeypatch):
    """verify.verify_greedy / verify_rejection and verify_planner.prefix_survival / top_k_verify_lengths
    call the kernels when Triton is chosen and the twins otherwise, with the same results."""
    from dspark_plugin.policy.verify_planner import prefix_survival, top_k_verify_lengths
    from dspark_plugin.decode.verify import verify_greedy, verify_rejection

    calls = []
    for name, (fast, twin) in list(dispatch.OPS.items()):
        counted = lambda *a, _f=fast, _n=name, **kw: calls.append(_n) or _f(*a, **kw)  # noqa: E731
        monkeypatch.setitem(dispatch.OPS, name, (counted, twin))
    b, g, v = 3, 4, 41
    gen = torch.Generator().manual_seed(1)
    conf = torch.rand(b, g, generator=gen)
    logits = torch.randn(b, g + 1, v, generator=gen)
    tp, dp = torch.softmax(logits, -1), torch.softmax(torch.randn(b, g, v, generator=gen), -1)
    draft = torch.multinomial(dp.view(-1, v), 1, generator=gen).view(b, g)
    vlen = torch.tensor([4, 1, 0])

    def run():
        a = prefix_survival(conf)
        lens = top_k_verify_lengths(a, 5)
        rg = verify_greedy(draft, logits, vlen)
        rr = verify_rejection(draft, dp, tp, vlen, torch.Generator().manual_seed(9))
        return a, lens, rg.tokens, rg.num_accepted, rr.tokens, rr.num_accepted

    monkeypatch.setenv("DSPARK_FORCE_TRITON", "0")
    twin = run()
    assert calls == []
    monkeypatch.setenv("DSPARK_FORCE_TRITON", "1")
    kern = run()
    assert calls == ["prefix_survival", "admit_topk", "accept_greedy", "accept_rejection"]
    torch.testing.assert_close(kern[0], twin[0], rtol=1e-6, atol=1e-7)
    for x, y in zip(kern[1:], twin[1:]):
        assert torch.equal(x, y)
