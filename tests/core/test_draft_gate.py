"""The load-aware draft gate (engine-free): it compares tokens/s with and without drafting per
batch-size bucket, in pairs of neighbouring steps, and drafts only where drafting has been earning
more; the vLLM planner feeds it."""
from __future__ import annotations

import pytest
import torch

from dspark_plugin.errors import DSparkError
from dspark_plugin.policy.draft_gate import PROBE_COST, DraftGate, bucket
from dspark_plugin.policy.engine_plan import VerifyPlanner, settings_from_env
from dspark_plugin.policy.step_rate import SPSCurve
from dspark_plugin.policy.verify_planner import prefix_survival


def test_buckets():
    assert [bucket(r) for r in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33)] == [1, 1, 2, 3, 4, 8, 8, 16, 16, 32, 32, 64]


def run(gate: DraftGate, steps: int, batch: int, draft_step_s: float, draft_tokens_per_req: float,
        skip_step_s: float, clock: float = 0.0, slowdown=lambda i: 1.0) -> tuple[list[bool], float]:
    """Drive the gate with a simulated engine: each choice costs its step time (times the machine's
    slowdown at step i) and emits its tokens."""
    choices = []
    for i in range(steps):
        d = gate.decide(batch, clock)
        choices.append(d)
        gate.emitted(batch * (draft_tokens_per_req if d else 1.0))
        clock += (draft_step_s if d else skip_step_s) * slowdown(i)
    return choices, clock


def probe_interval(rate_a: float, rate_b: float, length: float = 1.0) -> int:
    """Steps between probes: the gap between the two tokens/s times the loser's step time over the
    winner's (`length`), over the cost budget, clamped to probe_min..probe_max (4..256)."""
    gap = abs(rate_a - rate_b) / max(rate_a, rate_b)
    return min(256, max(4, round(gap * length / PROBE_COST)))


def probes_after(last: int, pairs: int, every: int, steps: int, window: int = 32, early: float | None = 1.0) -> list[int]:
    """Steps of the probes after step `last`, a bucket then holding `pairs` pairs: every `every`
    steps, but while the bucket has fewer than `window` pairs and a probe is cheap (early: the
    loser's step length; None: a costly probe, no early probes) at least every `pairs x length`
    steps (>= probe_min = 4)."""
    out = []
    while True:
        last += min(every, max(4, round(pairs * early))) if early is not None and pairs < window else every
        if last >= steps:
            return out
        out.append(last)
        pairs += 1


def test_warmup_alternates_then_skips_where_drafting_does_not_pay():
    gate = DraftGate(warmup=4)
    # Drafting: 1.2 tokens per request in 40 ms; not drafting: 1 token in 30 ms -> skipping is 10% faster.
    choices, _ = run(gate, 200, 16, 0.040, 1.2, 0.030)
    assert choices[:8] == [True, False] * 4  # both windows fill side by side, under the same load
    drafted = [i for i, d in enumerate(choices) if d and i >= 8]
    # Only the probes draft once it knows. A probe gives up 10% over a step 4/3 as long: one every
    # 27 steps once the bucket has its window of pairs, every len(pairs) x 4/3 steps before.
    every = probe_interval(16 * 1.2 / 0.04, 16 / 0.03, 0.04 / 0.03)
    assert every == 27 and drafted == probes_after(7, 4, every, 200, early=0.04 / 0.03)
    assert drafted[:4] == [12, 19, 27, 36]
    assert gate.skipped == 200 - len(drafted) - 4
    assert gate.buckets[16].ratio == pytest.approx((1.2 / 0.04) / (1 / 0.03))
    assert len(gate.buckets[16].pairs) == 4 + len(drafted)  # warm-up pairs, then one per probe


def test_a_costly_probe_is_rare_from_the_first_pairs():
    # High load: drafting earns 28% less in steps 5/3 as long (1.2 tokens per request in 50 ms vs 1
    # in 30 ms), so each probe gives up ~0.47 of a step. Probing every len(pairs) steps, as a cheap
    # close call is, would cost 2-3% of the throughput for a verdict few pairs cannot overturn.
    gate = DraftGate(warmup=4)
    choices, _ = run(gate, 300, 32, 0.050, 1.2, 0.030)
    every = probe_interval(32 * 1.2 / 0.05, 32 / 0.03, 0.05 / 0.03)
    assert every == 93
    assert [i for i, d in enumerate(choices) if d and i >= 8] == probes_after(7, 4, every, 300, early=None) == [100, 193, 286]


def test_a_drifting_machine_does_not_make_a_stale_measurement_win():
    # Drafting is 10% slower per token at every moment, but the machine slows down 3x over the run
    # (other work on a shared host). Comparing the last probes' average (taken when it was fast)
    # with the last skipped steps (taken now) would read drafting as the winner; pairs do not.
    gate = DraftGate(warmup=4)
    choices, _ = run(gate, 400, 16, 0.055 * 1.1, 1.0, 0.055, slowdown=lambda i: 1 + i / 200)
    # The probe interval reads the step length from pairs too (10% longer), not from each choice's
    # recent steps (the drafted ones were timed when the machine was faster).
    every = probe_interval(1 / 1.1, 1.0, 1.1)
    assert every == 20 and 0 < sum(choices[8:]) <= len(probes_after(7, 4, every, 400, early=1.1))  # the probes only
    assert gate.buckets[16].length(True) == pytest.approx(1.1, rel=0.02)
    assert gate.buckets[16].ratio == pytest.approx(1 / 1.1, rel=0.02)


def test_a_wide_gap_read_from_few_pairs_is_not_probed_early():
    # Drafting earns half of not drafting (16 requests: 1.1 tokens each in 66 ms vs 1 in 30 ms):
    # a verdict few pairs cannot overturn, so probes come at the gap's interval from the start,
    # and each gives up half of a step 2.2 times as long: one every 220 steps.
    gate = DraftGate(warmup=4)
    choices, _ = run(gate, 500, 16, 0.066, 1.1, 0.030)
    every = probe_interval(16 * 1.1 / 0.066, 16 / 0.03, 0.066 / 0.030)
    assert every == 220
    assert [i for i, d in enumerate(choices) if d and i >= 8] == [7 + every * k for k in (1, 2)]


def test_drafts_where_drafting_pays_and_probes_a_close_call_often():
    gate = DraftGate(warmup=4)
    # 1.4 tokens per request in 40 ms vs 1 token in 30 ms -> drafting is 5% faster: a close call.
    choices, _ = run(gate, 160, 1, 0.040, 1.4, 0.030)
    skipped = [i for i, d in enumerate(choices) if not d]
    assert skipped[:4] == [1, 3, 5, 7]
    # Not drafting is the loser, in steps 3/4 as long: its probes are cheaper, so more frequent.
    every = probe_interval(1.4 / 0.04, 1 / 0.03, 0.75)
    assert every == 7 and skipped[4:] == probes_after(7, 4, every, 160, early=0.75)
    assert "drafted" in gate.summary() and "R~1" in gate.summary()


def test_a_few_long_acceptances_count_at_their_full_weight():
    # One request: a drafted step takes 45 ms instead of 35 and usually gains nothing, but one in
    # four accepts 4 drafts. Per step, drafting mostly looks worse (a median of pairs would skip);
    # in tokens it earns 2 per 45 ms vs 1 per 35 ms, so it must keep drafting.
    gate, clock, drafted = DraftGate(warmup=4), 0.0, 0
    choices = []
    for _ in range(300):
        d = gate.decide(1, clock)
        choices.append(d)
        drafted += d
        gate.emitted(1 + (4 if d and drafted % 4 == 0 else 0))
        clock += 0.045 if d else 0.035
    # Drafting wins by 56%; its loser (not drafting) is probed every ~pairs x 35/45 steps at first,
    # every 56 from 32 pairs on: <= 8% of the steps.
    assert sum(choices[100:]) >= 184
    assert gate.buckets[1].ratio > 1.3


def test_buckets_follow_the_load():
    gate = DraftGate(warmup=2)
    _, clock = run(gate, 64, 1, 0.045, 2.0, 0.030)          # low load: drafting pays
    choices, clock = run(gate, 64, 32, 0.200, 1.1, 0.120, clock)  # high load: it does not
    probes = [p for p in probes_after(3, 2, 64, 64) if p >= 32]   # a new bucket: few pairs, probed often
    assert len(probes) == 4 and sum(choices[-32:]) <= len(probes)
    choices, _ = run(gate, 32, 1, 0.045, 2.0, 0.030, clock)     # back to low load: drafts again
    assert choices.count(False) <= 32 // 7  # the probes of not drafting (its steps 2/3 as long)


def test_a_new_bucket_borrows_from_a_measured_neighbour():
    gate = DraftGate(warmup=2)
    _, clock = run(gate, 32, 4, 0.060, 1.1, 0.040)  # at R = 4 not drafting already wins
    # R = 16 has no samples yet: drafting pays even less at a larger batch, so it starts skipping
    # and drafts only every 4th step (the probes that give the bucket its own samples).
    choices, clock = run(gate, 9, 16, 0.200, 1.1, 0.120, clock)
    assert [i for i, d in enumerate(choices) if d] == [3, 7]
    assert len(gate.buckets[16].pairs) == 2  # now its own measurements decide
    # The other direction: drafting wins at R = 16, so R = 8 (never seen) drafts from the start.
    gate = DraftGate(warmup=2)
    _, clock = run(gate, 32, 16, 0.050, 3.0, 0.040)
    choices, _ = run(gate, 8, 8, 0.050, 3.0, 0.040, clock)
    assert choices == [True, True, True, False] * 2
    # A smaller bucket where drafting wins says nothing about a larger one: plain warm-up.
    gate = DraftGate(warmup=2)
    _, clock = run(gate, 32, 1, 0.050, 3.0, 0.040)
    choices, _ = run(gate, 4, 8, 0.050, 3.0, 0.040, clock)
    assert choices == [True, False, True, False]


def test_a_step_that_shared_its_pass_with_a_prefill_is_not_measured():
    gate = DraftGate(warmup=1)
    assert gate.decide(4, 0.0)
    gate.emitted(4 + 2.0, verified=6)
    # The target processed 4 requests + 6 drafts + a 300-token prompt: not this choice's cost.
    assert gate.decide(4, 0.5, accepted=2, step_tokens=310)  # still no sample: warm-up drafts again
    assert gate.buckets[4].samples[True] == 0 and gate.dropped == 1
    gate.emitted(4 + 2.0, verified=6)
    assert not gate.decide(4, 0.56, accepted=2, step_tokens=10)  # a plain decode step: measured
    assert gate.buckets[4].samples[True] == 1 and gate.buckets[4].run == [(6.0, pytest.approx(0.06))]
    assert "1 steps with a prefill not measured" in gate.summary()


def test_idle_gaps_are_not_step_costs():
    gate = DraftGate(warmup=1, max_step_s=1.0)
    gate.decide(1, 0.0)
    gate.emitted(2.0)
    assert gate.decide(1, 100.0)  # the engine idled 100 s: not a measurement, so still warming up
    assert gate.buckets[1].samples[True] == 0
    gate.emitted(1.0)
    gate.decide(1, 100.02)
    assert gate.buckets[1].samples[True] == 1 and gate.buckets[1].run == [(1.0, pytest.approx(0.02))]


def test_waits_between_requests_do_not_swamp_the_rate():
    gate = DraftGate(warmup=1, max_step_s=5.0)
    t = 0.0
    for i in range(40):
        gate.decide(1, t)
        gate.emitted(1.0)
        t += 1.5 if i == 10 else 0.04  # one 1.5 s wait for a new request among 40 ms steps
    gate.decide(1, t)
    s = gate.buckets[1]
    assert sum(s.samples.values()) == 40 - 1 and len(s.pairs) >= 5  # the wait is not a sample
    assert s.ratio == pytest.approx(1.0)


def test_measured_acceptance_replaces_the_expected_count():
    gate = DraftGate(warmup=1)
    gate.decide(4, 0.0)
    gate.emitted(4 + 2.5)                    # the scheduler expected 2.5 accepted drafts
    gate.decide(4, 0.1, accepted=1)           # the engine says 1 was accepted
    assert gate.buckets[4].run == [(5.0, pytest.approx(0.1))]
    gate.emitted(4)                           # a step without drafts: nothing to correct
    gate.decide(4, 0.15, accepted=3)
    assert gate.buckets[4].ratio == pytest.approx((5 / 0.1) / (4 / 0.05))


def test_bad_gate_settings():
    with pytest.raises(DSparkError, match="probe_min"):
        DraftGate(probe_min=1)
    with pytest.raises(DSparkError, match="probe_min"):
        DraftGate(probe_min=8, probe_max=4)
    assert settings_from_env({}).draft_gate is True
    assert settings_from_env({"DSPARK_DRAFT_GATE": "Off"}).draft_gate is False
    with pytest.raises(DSparkError, match="DSPARK_DRAFT_GATE: 'maybe' is not one of on, off"):
        settings_from_env({"DSPARK_DRAFT_GATE": "maybe"})


CURVE = SPSCurve.from_measurements([1, 64], [100.0, 100.0 / (1 + 0.1 * 63)])


def test_planner_feeds_the_gate_expected_tokens_and_counts_skips_as_zero_verified():
    logged: list[str] = []
    gate = DraftGate(warmup=1)
    planner = VerifyPlanner("early_stop", CURVE, gate=gate, log=logged.append, log_every=1000)
    conf = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) ** 0.25
    assert planner.should_draft(3, 0.0)
    lengths = planner.plan(conf)
    surv = prefix_survival(conf.double())
    expected = 3 + sum(float(surv[r, :l].sum()) for r, l in enumerate(lengths))
    assert gate._tokens == pytest.approx(expected)
    assert not planner.should_draft(3, 0.05, step_tokens=3 + sum(lengths))  # warm-up of the other choice
    planner.skip(3, 7)
    assert gate.buckets[3].run == [(pytest.approx(expected), pytest.approx(0.05))]
    # vLLM reports the drafts rejected in the step that ran: accepted = verified - rejected.
    gate2 = DraftGate(warmup=1)
    p2 = VerifyPlanner("early_stop", CURVE, gate=gate2)
    p2.should_draft(3, 0.0)
    verified = sum(p2.plan(conf))
    p2.should_draft(3, 0.05, rejected=verified - 1)
    assert gate2.buckets[3].run == [(4.0, pytest.approx(0.05))]
    assert planner.request_steps == 6 and planner.verified == sum(lengths)
    # The proposer's own time on steps without a draft is in the summary (the plugin's overhead then).
    assert "without a draft" not in planner.summary()
    planner.skip(3, 7, seconds=0.002)
    planner.skip(3, 7, seconds=0.004)
    assert "proposer 3.00 ms per step without a draft" in planner.summary()
    assert logged == ["dspark-plugin draft gate: first step without a draft (batch of 3)"]
    assert "draft gate: drafted 1 of 2 steps" in planner.summary()


def test_fixed_mode_has_no_gate():
    planner = VerifyPlanner("fixed", None, gate=DraftGate())
    assert planner.gate is None and all(planner.should_draft(8, float(t)) for t in range(50))
