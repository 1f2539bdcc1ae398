"""Counter RNG: Triton and twin bit-identical; Gumbel-max with it samples softmax exactly.

Kernel tests need TRITON_INTERPRET=1 from before Triton is first imported (Triton's own
standard-library functions are decorated at import), and setting it inside a shared pytest process
would leak into everything else that imports Triton (vLLM). So each kernel test file runs only
under TRITON_INTERPRET=1, and tests/kernels/test_kernels.py runs all of them in such a subprocess.
"""
from __future__ import annotations

import os

import pytest
import torch
from scipy.stats import chisquare

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests run in a TRITON_INTERPRET=1 subprocess from tests/kernels/test_kernels.py",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dspark_plugin.kernels import rng  # noqa: E402


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs and workspaces start as NaN / -1, so any element left unwritten shows."""
    monkeypatch.setenv("DSPARK_KERNELS_POISON", "1")


def _rng_probe_kernel():
    @triton.jit
    def probe(seed_ptr, key_ptr, u_ptr, g_ptr, step, B: tl.constexpr, V: tl.constexpr):
        r = tl.arange(0, B)
        c = tl.arange(0, V)
        rk = rng.row_key(tl.load(seed_ptr + r), step)
        tl.store(key_ptr + r, rk.to(tl.int64))
        tl.store(u_ptr + r[:, None] * V + c[None, :], rng.uniform(rk[:, None], c[None, :]))
        tl.store(g_ptr + r[:, None] * V + c[None, :], rng.gumbel(rk[:, None], c[None, :]))

    return probe


def test_exponential_is_precise_near_zero():
    w = torch.tensor([2.0**-40, 2.0**-20, 1e-4, 0.01, 0.0624, 0.0626, 0.5, 0.99], dtype=torch.float32)
    exact = -torch.log1p(-w.double())
    assert torch.allclose(rng.exponential_torch(w).double(), exact, rtol=3e-7, atol=0)


@pytest.mark.parametrize("step", [0, 1, 6, 2**31 + 5])
def test_rng_bit_identical_to_twin(step):
    probe = _rng_probe_kernel()
    seeds = torch.tensor([0, 1, 2**40 + 7, -5, 2**31 + 3, 12345, 99, 2**32 - 1])
    key = torch.full((8,), -1, dtype=torch.int64)
    u = torch.full((8, 128), float("nan"))
    g = torch.full((8, 128), float("nan"))
    probe[(1,)](seeds, key, u, g, step, B=8, V=128)
    rk = rng.row_key_torch(seeds, step)
    assert torch.equal(key, rk)
    assert torch.equal(u, rng.uniform_torch(rk[:, None], torch.arange(128)[None, :]))
    # numpy (interpreter) and torch logs may differ in the last bit
    torch.testing.assert_close(g, rng.gumbel_torch(seeds, step, 128), rtol=1e-6, atol=1e-6)
    assert 0 < float(u.min()) and float(u.max()) < 1
    # different seeds / steps give different streams
    assert len({tuple(row.tolist()) for row in u}) == 8


def test_gumbel_max_samples_the_softmax():
    from dspark_plugin.kernels.epilogue import sample_epilogue_torch

    n, v = 40000, 6
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temp = torch.full((n,), 0.8)
    tok, logprob, _ = sample_epilogue_torch(logits.expand(n, v), temp, torch.arange(n) * 2654435761, step=3)
    p = torch.softmax(logits / 0.8, -1)
    counts = torch.bincount(tok, minlength=v).double()
    expected = p.double() / p.double().sum() * n
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-4
    assert torch.allclose(logprob, p.log()[tok], atol=1e-5)
    # the same seed at another step is a fresh draw
    tok2, _, _ = sample_epilogue_torch(logits.expand(n, v), temp, torch.arange(n) * 2654435761, step=4)
    assert 0.2 < float((tok != tok2).double().mean()) < 0.9
