"""Batched reference runner with the confidence scheduler: greedy output must equal target-only
decoding token for token (tiny real HF targets and DSpark drafters built here)."""
from __future__ import annotations

import pytest
import torch

from dspark_plugin.errors import DSparkError
from dspark_plugin.policy.verify_planner import prefix_survival, schedule_verify_lengths, verify_len_fn
from dspark_plugin.reference.batched_runner import BatchedRunner
from dspark_plugin.reference.runner import ReferenceRunner
from tiny import tiny_drafter, tiny_target


def prompts(n: int, seed: int = 0, vocab: int = 90) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")


def sps(b: int) -> float:
    return 1.0 / (1.0 + 0.04 * b)


@pytest.fixture(scope="module")
def llama():
    return tiny_target("llama")


@pytest.fixture(scope="module")
def reference(llama):
    ps = prompts(6)
    return ps, [ReferenceRunner(llama, None).generate(p, max_new_tokens=40).tokens for p in ps]


@pytest.mark.parametrize("scheduler", ["early_stop", "async", "fixed"])
@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_greedy_equals_target_only(llama, reference, scheduler, head):
    ps, ref = reference
    runner = BatchedRunner(llama, tiny_drafter(llama, head=head), scheduler=scheduler, sps=sps)
    out = runner.generate(ps, max_new_tokens=40)
    assert [r.tokens for r in out.results] == ref
    verified = [v for r in out.results for v in r.verified]
    if scheduler == "fixed":
        assert set(verified) == {7}
    else:
        # The scheduler really chose: lengths differ between requests/steps and are not all full.
        assert len(set(verified)) > 1 and min(verified) < 7
    assert sum(sum(r.accepted) for r in out.results) > 0  # some drafts were accepted: KV holes got exercised


def test_target_only_batched_equals_single(llama, reference):
    ps, ref = reference
    out = BatchedRunner(llama, None).generate(ps, max_new_tokens=40)
    assert [r.tokens for r in out.results] == ref
    assert out.mean_verify_len == 0


def test_qwen3_target_and_eos():
    target = tiny_target("qwen3", seed=3)
    ps = prompts(4, seed=5)
    eos = {5, 17}
    ref = [ReferenceRunner(target, None).generate(p, max_new_tokens=30, eos_token_ids=eos).tokens for p in ps]
    out = BatchedRunner(target, tiny_drafter(target, head="gated"), sps=sps).generate(ps, max_new_tokens=30,
                                                                                     eos_token_ids=eos)
    assert [r.tokens for r in out.results] == ref


def test_load_shrinks_mean_verify_length(llama):
    drafter = tiny_drafter(llama)
    ps = prompts(12, seed=2)
    steep = lambda b: 1.0 / (1.0 + 0.15 * b)  # noqa: E731
    one = BatchedRunner(llama, drafter, sps=steep).generate(ps[:1], max_new_tokens=16)
    many = BatchedRunner(llama, drafter, sps=steep).generate(ps, max_new_tokens=16)
    assert one.mean_verify_len > many.mean_verify_len


def test_callable_scheduler_gets_survivals(llama, reference):
    ps, ref = reference
    seen = []

    def sched(survival):
        seen.append(survival.shape)
        assert ((survival[:, 1:] <= survival[:, :-1]) | (survival[:, 1:] == 0)).all()
        return schedule_verify_lengths(survival, sps)

    out = BatchedRunner(llama, tiny_drafter(llama), scheduler=sched).generate(ps[:3], max_new_tokens=12)
    assert [r.tokens for r in out.results] == [r[:12] for r in ref[:3]]
    assert seen and all(s[1] == 7 for s in seen) and seen[0][0] == 3


def test_sps_measured_when_not_given(llama, reference):
    ps, ref = reference
    runner = BatchedRunner(llama, tiny_drafter(llama), gamma=4)
    out = runner.generate(ps[:2], max_new_tokens=10)
    assert [r.tokens for r in out.results] == [r[:10] for r in ref[:2]]
    curve = runner.sps
    assert curve.batch_sizes[-1] == 2 * (1 + 4)
    assert all(b <= a for a, b in zip(curve.sps, curve.sps[1:]))


def test_draft_gate_skips_whole_steps_and_output_stays_identical(llama, reference):
    from dspark_plugin.policy.draft_gate import DraftGate

    ps, ref = reference
    # warmup 1, probe every 2nd step: both choices are taken whatever the timings say.
    gate = DraftGate(probe_min=2, probe_max=2, warmup=1)
    out = BatchedRunner(llama, tiny_drafter(llama), sps=sps, draft_gate=gate).generate(ps, max_new_tokens=40)
    assert [r.tokens for r in out.results] == ref
    assert 0 < gate.skipped < gate.steps == out.num_steps
    assert all(r.fallbacks == 0 for r in out.results)  # a skipped step is not a drafter failure
    assert sum(sum(r.accepted) for r in out.results) > 0
    assert sum(len(b.pairs) for b in gate.buckets.values()) > 0  # it compared the two choices


def test_broken_drafter_falls_back_to_target(llama, reference):
    ps, ref = reference
    drafter = tiny_drafter(llama)
    with torch.no_grad():
        drafter.markov_head.markov_w2.weight.fill_(float("nan"))
    out = BatchedRunner(llama, drafter, sps=sps).generate(ps[:3], max_new_tokens=10)
    assert [r.tokens for r in out.results] == [r[:10] for r in ref[:3]]
    assert all(r.fallbacks == r.num_rounds > 0 for r in out.results)


def test_sampling_runs_and_is_seeded(llama):
    runner = BatchedRunner(llama, tiny_drafter(llama), scheduler="async", sps=sps)
    ps = prompts(3, seed=9)
    a = runner.generate(ps, max_new_tokens=12, temperature=1.0, seed=4)
    b = runner.generate(ps, max_new_tokens=12, temperature=1.0, seed=4)
    assert [r.tokens for r in a.results] == [r.tokens for r in b.results]
    assert all(len(r.tokens) == 12 and all(0 <= t < 96 for t in r.tokens) for r in a.results)


def test_bad_arguments(llama):
    with pytest.raises(DSparkError, match="unknown"):
        BatchedRunner(llama, tiny_drafter(llama), scheduler="sometimes")
    with pytest.raises(DSparkError, match="gamma"):
        BatchedRunner(llama, tiny_drafter(llama), gamma=9)
    with pytest.raises(DSparkError, match="at least one token"):
        BatchedRunner(llama, None).generate([[3], []])


def test_prefix_survival_helper():
    c = torch.tensor([[0.5, 0.5, 1.0]])
    assert prefix_survival(c).tolist() == [[0.5, 0.25, 0.25]]


def test_reference_runner_with_scheduler(llama, reference):
    ps, ref = reference
    drafter = tiny_drafter(llama)
    steep = lambda b: 1.0 / (1.0 + 0.2 * b)  # noqa: E731
    outs = [ReferenceRunner(llama, drafter, verify_len_fn=verify_len_fn(steep)).generate(p, max_new_tokens=40)
            for p in ps[:3]]
    assert [o.tokens for o in outs] == ref[:3]
    verified = [v for o in outs for v in o.verified]
    assert min(verified) < 7 and max(verified) > 0


def test_greedy_long_accepted_runs():
    # A near-zero init target repeats the last prompt token forever; a drafter whose Markov head
    # copies the previous token gets long accepted runs, so rows advance by very different amounts
    # and the KV holes / per-row positions are stressed with acceptance, not only rejection.
    target = tiny_target("llama", seed=1, init=0.02, vocab=16)
    drafter = tiny_drafter(target, head="vanilla", rank=16)
    with torch.no_grad():
        drafter.markov_head.markov_w1.weight.copy_(torch.eye(16) * 50.0)
        drafter.markov_head.markov_w2.weight.copy_(torch.eye(16))
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(2, 15, (int(n),), generator=g).tolist() for n in (3, 7, 2, 11, 5)]
    ref = [ReferenceRunner(target, None).generate(p, max_new_tokens=48).tokens for p in ps]
    out = BatchedRunner(target, drafter, sps=lambda b: 1.0 / (1.0 + 0.03 * b)).generate(ps, max_new_tokens=48)
    assert [r.tokens for r in out.results] == ref
    acc = [a for r in out.results for a in r.accepted]
    ver = [v for r in out.results for v in r.verified]
    assert max(acc) >= 4 and sum(acc) / len(acc) > 1.5, acc
    assert len(set(ver)) > 2, ver  # verify lengths differ between rows/steps


def exact_first_tokens(target, prompt: list[int], n: int, temperature: float) -> dict[tuple, float]:
    """P(first n generated tokens) under the target, by enumerating every prefix."""
    from dspark_plugin.decode.sampling import logits_to_probs

    probs = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            prefixes = list(probs)
            step = logits_to_probs(target(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1], temperature)
            probs = {p + (t,): probs[p] * float(step[i, t]) for i, p in enumerate(prefixes)
                     for t in range(step.shape[-1])}
    return probs


@pytest.mark.parametrize("gated", [False, True])
def test_sampling_with_scheduler_keeps_target_distribution(gated):
    """Row 0 of each batch is the measured request, rows 1-3 are load with other prompts.
    (Only one row per batch is counted: the scheduler couples concurrent requests, so their
    outputs need not be independent of each other, though each one follows the target.)
    The strong statistical checks of the scheduler are in test_scheduler_lossless.py; this one
    checks that the runner wires drafts, lengths and verification together losslessly, with and
    without the draft gate skipping whole steps."""
    import numpy as np
    from scipy.stats import chisquare

    target = tiny_target(vocab=6, layers=4, init=0.1)
    drafter = tiny_drafter(target, "vanilla", rank=4)
    with torch.no_grad():  # a confidence that varies with context, so row 0's lengths vary
        drafter.confidence_head.proj.weight.mul_(10.0)
        drafter.confidence_head.proj.bias.fill_(1.5)
    from dspark_plugin.policy.draft_gate import DraftGate

    gate = DraftGate(probe_min=2, probe_max=2, warmup=1) if gated else None
    runner = BatchedRunner(target, drafter, sps=lambda b: 1.0 / (1.0 + 0.06 * max(0, b - 4)), draft_gate=gate)
    prompt, load = [2, 3, 4], [[5, 1], [3, 3, 2, 5], [4]]
    trials, observed, verified = 500, {}, []
    for seed in range(trials):
        out = runner.generate([prompt] + load, max_new_tokens=3, temperature=1.0, seed=seed)
        key = tuple(out.results[0].tokens)
        observed[key] = observed.get(key, 0) + 1
        verified += out.results[0].verified
    assert len(set(verified)) >= 2 and 0 < np.mean(verified) < 6  # the scheduler made real choices
    assert not gated or 0 < gate.skipped < gate.steps
    expected = exact_first_tokens(target, prompt, 3, 1.0)
    cells = sorted(expected, key=expected.get, reverse=True)
    exp = np.array([expected[c] * trials for c in cells])
    obs = np.array([observed.get(c, 0) for c in cells], dtype=float)
    big = exp >= 5  # merge rare cells so the chi-square approximation holds
    obs = np.append(obs[big], obs[~big].sum())
    exp = np.append(exp[big], exp[~big].sum())
    assert obs.sum() == trials
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 0.01
