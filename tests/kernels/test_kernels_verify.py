"""Prefix survival, top-budget admission and variable-length acceptance kernels vs twins (and vs
dspark_plugin.decode.verify, whose semantics they implement)."""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests run in a TRITON_INTERPRET=1 subprocess from tests/kernels/test_kernels.py",
                allow_module_level=True)

from test_kernels_rng import poisoned  # noqa: E402,F401

from dspark_plugin.decode.verify import verify_greedy, verify_rejection  # noqa: E402
from dspark_plugin.kernels import accept, survival  # noqa: E402

SHAPES = [(1, 3, 50), (6, 4, 37), (5, 7, 300), (3, 1, 129)]


@pytest.mark.parametrize("r,g", [(1, 7), (5, 3), (33, 5)])
def test_prefix_survival(poisoned, r, g):
    conf = torch.rand(r, g)
    a = survival.prefix_survival_triton(conf)
    torch.testing.assert_close(a, survival.prefix_survival_torch(conf), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a, conf.cumprod(-1))


@pytest.mark.parametrize("r,g", [(1, 7), (6, 4), (13, 5)])
def test_admission_selects_top_budget_prefixes(poisoned, r, g):
    a = torch.rand(r, g, generator=torch.Generator().manual_seed(r * g)).cumprod(-1)
    a[0, :2] = 0.5  # ties inside a row and across rows
    if r > 1:
        a[1, 0] = 0.5
    a = a.cummin(dim=1).values  # survivals never increase along the block
    flat = a.flatten()
    for k in sorted({0, 1, 2, 3, (r * g) // 2, r * g - 1, r * g, r * g + 4}):
        got = survival.admit_topk_triton(a, k)
        assert torch.equal(got, survival.admit_topk_torch(a, k))
        assert int(got.sum()) == min(max(k, 0), r * g)
        if 0 < k <= r * g:  # the admitted entries are the k largest and form prefixes
            chosen = torch.arange(g)[None, :] < got[:, None]
            assert float(a[chosen].min()) >= float(flat.topk(k).values[-1])


@pytest.mark.parametrize("r,g", [(3, 4), (9, 3)])
def test_admission_ties_follow_the_scheduler_order(poisoned, r, g):
    """Kernel and twin break ties like verify_planner._admission_order (smaller j, then smaller r), so
    they admit exactly what the scheduler's exact float64 sort admits."""
    from dspark_plugin.policy.verify_planner import top_k_verify_lengths

    gen = torch.Generator().manual_seed(r + g)
    a = (torch.randint(1, 4, (r, g), generator=gen) / 3).cumprod(-1)  # few values: ties everywhere
    for k in range(r * g + 1):
        ref = top_k_verify_lengths(a.double(), k)
        assert torch.equal(survival.admit_topk_triton(a, k), ref)
        assert torch.equal(survival.admit_topk_torch(a, k), ref)


@pytest.mark.parametrize("force", ["0", "1"])
def test_verify_len_beyond_the_block_is_clamped(monkeypatch, force):
    """verify_len > g means "all g drafts": a full accept draws the bonus from p_t (tokens 0 or 3),
    never a correction from max(0, p_t - p_d) (always token 0 here); twin and kernel alike."""
    from dspark_plugin.decode.verify import verify_rejection

    monkeypatch.setenv("DSPARK_FORCE_TRITON", force)
    dp = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.5, 0.5]]])
    tp = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 0.0, 0.5]]])
    for vlen in (2, 3, 7):
        bonus = set()
        for seed in range(12):
            res = verify_rejection(torch.tensor([[1, 2]]), dp, tp, torch.tensor([vlen]),
                                   torch.Generator().manual_seed(seed))
            assert res.tokens[0, :2].tolist() == [1, 2] and int(res.num_accepted) == 2
            bonus.add(int(res.tokens[0, 2]))
        assert bonus == {0, 3}, vlen


def _greedy_case(b, g, v, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, g + 1, v, generator=gen)
    target = logits.argmax(-1)
    draft = target[:, :g].clone()
    flip = torch.rand(b, g, generator=gen) < 0.3
    draft[flip] = (draft[flip] + 1) % v
    verify_len = torch.randint(0, g + 1, (b,), generator=gen)
    return draft, logits, verify_len


@pytest.mark.parametrize("b,g,v", SHAPES)
def test_accept_greedy(poisoned, b, g, v):
    draft, logits, verify_len = _greedy_case(b, g, v, b * g + v)
    tokens, n = accept.accept_greedy_triton(draft, logits, verify_len)
    tt, tn = accept.accept_greedy_torch(draft, logits, verify_len)
    ref = verify_greedy(draft, logits, verify_len)
    assert torch.equal(tokens, tt) and torch.equal(n, tn)
    assert torch.equal(tokens, ref.tokens) and torch.equal(n, ref.num_accepted)


def _rejection_case(b, g, v, seed):
    gen = torch.Generator().manual_seed(seed)
    draft_probs = torch.softmax(torch.randn(b, g, v, generator=gen) * 2, -1)
    target_probs = torch.softmax(torch.randn(b, g + 1, v, generator=gen) * 2, -1)
    target_probs[0, 0] = draft_probs[0, 0]  # p_t == p_d: certain acceptance, no residual mass
    if g > 1:  # an almost-agreeing position
        target_probs[-1, 1] = 0.9 * draft_probs[-1, 1] + 0.1 * target_probs[-1, 1]
    draft = torch.multinomial(draft_probs.reshape(-1, v), 1, generator=gen).view(b, g)
    verify_len = torch.randint(0, g + 1, (b,), generator=gen)
    return draft, draft_probs, target_probs, verify_len


@pytest.mark.parametrize("b,g,v", SHAPES)
def test_accept_rejection(poisoned, b, g, v):
    draft, dp, tp, verify_len = _rejection_case(b, g, v, b + g + v)
    for trial in range(3):
        gen = torch.Generator().manual_seed(trial)
        u_accept, u_sample = torch.rand(b, g, generator=gen), torch.rand(b, generator=gen)
        tokens, n = accept.accept_rejection_triton(draft, dp, tp, verify_len, u_accept, u_sample)
        tt, tn = accept.accept_rejection_torch(draft, dp, tp, verify_len, u_accept, u_sample)
        assert torch.equal(n, tn) and torch.equal(tokens, tt)
        assert bool((n <= verify_len).all())
        # verify.verify_rejection draws u_accept, then u_sample, from the generator it is given
        ref = verify_rejection(draft, dp, tp, verify_len, generator=torch.Generator().manual_seed(trial))
        assert torch.equal(n, ref.num_accepted) and torch.equal(tokens, ref.tokens)


def test_rejection_final_token_distribution():
    """The correction token follows normalise(max(0, p_t - p_d)); the bonus follows p_t."""
    from scipy.stats import chisquare

    v, n = 5, 4000
    pd = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])
    pt = torch.tensor([0.1, 0.2, 0.3, 0.3, 0.1])
    draft = torch.zeros(n, 1, dtype=torch.int64)  # p_d(0) = 0.5 > p_t(0): rejected w.p. 0.8
    dp, tp = pd.expand(n, 1, v).contiguous(), pt.expand(n, 2, v).contiguous()
    gen = torch.Generator().manual_seed(0)
    args = (draft, dp, tp, torch.ones(n, dtype=torch.int64), torch.rand(n, 1, generator=gen), torch.rand(n, generator=gen))
    # the interpreter runs one program per row slowly: statistics on the twin, identity on a slice
    tokens, acc = accept.accept_rejection_torch(*args)
    kt, ka = accept.accept_rejection_triton(*(x[:48] for x in args))
    assert torch.equal(kt, tokens[:48]) and torch.equal(ka, acc[:48])
    rejected = acc == 0
    assert abs(float(rejected.double().mean()) - 0.8) < 0.03
    residual = (pt - pd).clamp(min=0)
    counts = torch.bincount(tokens[rejected, 0], minlength=v).double()
    keep = residual > 0
    assert counts[~keep].sum() == 0
    expected = residual[keep].double() / residual.sum() * counts.sum()
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-4
