"""The step-rate curve learned from served steps (policy/online_step_rate.py) and the planner using it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dspark_plugin.policy.draft_gate import DraftGate
from dspark_plugin.policy.engine_plan import SchedulerSettings, VerifyPlanner, make_planner, resolve_mode
from dspark_plugin.policy.online_step_rate import FILE_VERSION, OnlineStepRate


def step_time(tokens: int) -> float:
    """A made-up engine: flat up to 16 tokens (memory-bound), then linear."""
    return 0.040 + 0.004 * max(0, tokens - 16)


def test_unexplored_load_climbs_to_the_full_block_in_doublings():
    online = OnlineStepRate(explore_every=2)
    planner = VerifyPlanner("early_stop", None, online=online)
    conf = torch.full((1, 7), 0.9)
    # First drafted step of the bucket: twice the (nothing) measured, one draft per request.
    assert planner.plan(conf) == [1]
    online.observe(1, 2, step_time(2))
    # Only B = 2 measured: below it the prior makes time proportional to B, so verifying less looks
    # cheap, and the planner verifies nothing (which measures B = 1).
    assert planner.plan(conf) == [0]
    online.observe(1, 1, step_time(1))
    # Flat between B = 1 and 2, proportional beyond: one draft pays, a second does not yet.
    assert planner.plan(conf) == [3]   # the next rung: B = 4
    online.observe(1, 4, step_time(4))
    assert planner.plan(conf) == [3]   # planned: flat up to the measured B = 4
    assert planner.plan(conf) == [7]   # the next rung: the full block
    online.observe(1, 8, step_time(8))
    # Flat between B = 1 and 8: with survivals 0.9^j, the full block pays.
    assert planner.plan(conf) == [7] and online.explorations == 3


def test_exploration_at_high_load_doubles_what_was_measured():
    """At 8 requests the first exploration verifies one draft each (B = 16, not the full block's 64)."""
    online = OnlineStepRate(explore_every=1)
    for _ in range(3):
        online.observe(8, 8, 0.045)
    assert [online.explore(8, 7)] == [1]
    online.observe(8, 16, 0.055)
    assert online.explore(8, 7) == 3
    online.observe(8, 32, 0.09)
    assert online.explore(8, 7) == 7
    online.observe(7, 56, 0.14)        # R = 7 of the same bucket measured its full block
    assert online.explore(7, 7) == 0   # so the bucket refreshes only every refresh_every


def test_learned_curve_is_monotone_and_proportional_outside_the_data():
    online = OnlineStepRate()
    for _ in range(5):
        for b in (4, 8, 16, 32):
            online.observe(4, b, step_time(b) * (1.3 if b == 16 else 1.0))  # a bump the fit smooths
    curve = online.curve(4)
    sps = curve.table(1, 64)
    assert bool((sps[1:] <= sps[:-1] + 1e-12).all())
    assert math.isclose(1 / curve(64), (1 / curve(32)) * 2, rel_tol=1e-9)   # beyond: proportional
    assert math.isclose(1 / curve(2), (1 / curve(4)) / 2, rel_tol=1e-9)     # below: proportional
    assert online.curve(16) is None   # another bucket has measured nothing


def test_slow_outliers_and_idle_gaps_are_not_samples():
    online = OnlineStepRate()
    for _ in range(5):
        online.observe(1, 1, 0.040)
    online.observe(1, 1, 0.5)     # the machine was busy elsewhere: 12x the median
    online.observe(1, 1, 30.0)    # the engine idled between requests
    online.observe(1, 0, 0.040)   # nothing processed: not a step
    assert list(online.buckets[1].times[1]) == [0.040] * 5
    assert online.observed == 5


def test_exploration_depends_on_the_step_count_only():
    online = OnlineStepRate(explore_every=4, refresh_every=16)
    picks = [online.explore(2, 7) for _ in range(12)]
    assert picks == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]   # nothing measured: the first rung again
    online.observe(2, 16, 0.05)   # the full block of R = 2 measured: refresh every 16 drafted steps
    picks = [online.explore(2, 7) for _ in range(16)]
    assert picks.count(7) == 1 and picks.count(0) == 15


def test_saved_curve_restores_and_restarts_warm(tmp_path):
    path = tmp_path / "online_sps.json"
    first = OnlineStepRate(path=path, key="k", save_every=10)
    for i in range(20):
        first.observe(1, 1 + (i % 8), step_time(1 + (i % 8)))
    assert path.is_file()
    second = OnlineStepRate(path=path, key="k")
    assert second.load() and second.loaded_steps == 20
    conf = torch.full((1, 7), 0.9)
    planner = VerifyPlanner("early_stop", None, online=second)
    assert planner.plan(conf) == [7]   # no exploration of a loaded bucket at once; the curve pays
    assert second.explorations == 0
    other = OnlineStepRate(path=path, key="another target")
    assert not other.load() and not other.buckets


def test_corrupt_or_foreign_saved_curve_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "online_sps.json"
    warned: list[str] = []
    cases = [
        "{not json",
        json.dumps({"version": 99, "entries": {}}),
        json.dumps({"version": FILE_VERSION, "entries": {"k": {"key": "written elsewhere", "buckets": {}}}}),
        json.dumps({"version": FILE_VERSION, "entries": {"k": {"key": "k", "buckets": {"1": {"1": [-1.0, 3]}}}}}),
        json.dumps({"version": FILE_VERSION, "entries": {"k": {"key": "k", "buckets": {"1": {"1": "x"}}}}}),
        json.dumps([1, 2]),
    ]
    for text in cases:
        path.write_text(text)
        online = OnlineStepRate(path=path, key="k", warn=warned.append)
        assert not online.load()
        assert not online.buckets
    assert len(warned) == len(cases)
    assert all(str(path) in w and "ignoring the saved curve" in w for w in warned)
    online.observe(1, 1, 0.04)
    online.save()   # a damaged file is replaced by a good one
    assert json.loads(path.read_text())["entries"]["k"]["buckets"]["1"]["1"] == [0.04, 1]


def test_planner_measures_the_time_between_proposals():
    online = OnlineStepRate()
    planner = VerifyPlanner("early_stop", None, online=online)
    planner.begin_step(batch=2, step_tokens=2, now=0.0)   # nothing before: no sample
    planner.end_step(1.0)
    planner.begin_step(batch=2, step_tokens=2, now=1.05)
    assert list(online.buckets[2].times[2]) == [1.05 - 1.0]
    planner.end_step(2.0)
    planner.begin_step(batch=2, step_tokens=40, now=2.05)  # a prefill shared the pass: not measured
    assert 40 not in online.buckets[2].times


def test_a_prefill_pass_between_proposals_is_not_measured():
    """The SGLang worker runs prefills as passes of their own between decode steps: discard_step()."""
    online = OnlineStepRate()
    planner = VerifyPlanner("early_stop", None, online=online)
    planner.end_step(1.0)
    planner.discard_step()
    planner.begin_step(batch=1, step_tokens=1, now=3.0)
    assert not online.buckets


def test_make_planner_keys_the_learned_curve_by_engine(tmp_path, monkeypatch):
    """Both adapters build their planner here: no curve anywhere -> learned online, saved under the
    engine's own key; the full block when the engine cannot take per-request lengths, or it was asked."""
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    target, drafter = tmp_path / "target", tmp_path / "drafter"
    for d in (target, drafter):
        d.mkdir()
        (d / "config.json").write_text("{}")
    lines: list[str] = []
    settings = SchedulerSettings(None, None)
    planner = make_planner("sglang", str(target), str(drafter), True, "cpu", torch.float32, settings, None,
                           log=lines.append, warn=lines.append)
    assert planner.mode == "early_stop" and planner.gate is not None
    assert planner.online.key.startswith("sglang|")
    assert lines[0].startswith("dspark-plugin scheduler: mode early_stop, SPS curve learned online (new; saved to")
    assert lines[1] == "dspark-plugin draft gate: on"
    fixed = make_planner("vllm", str(target), str(drafter), True, "cpu", torch.float32, settings, None,
                         log=lines.append, warn=lines.append, fixed_because="async scheduling needs a fixed block")
    assert fixed.mode == "fixed" and fixed.gate is None
    assert lines[-1] == ("dspark-plugin scheduler: fixed (requested default): verifying the full block; "
                         "async scheduling needs a fixed block")
    asked = make_planner("sglang", str(target), str(drafter), True, "cpu", torch.float32,
                         SchedulerSettings("fixed", None), None, log=lines.append, warn=lines.append)
    assert asked.mode == "fixed" and lines[-1] == "dspark-plugin scheduler: fixed (requested fixed): verifying the full block"


def test_online_planning_is_the_default_without_a_curve():
    assert resolve_mode(None, None, True, online=True) == ("early_stop", None)
    mode, why = resolve_mode(None, None, True, online=False)
    assert mode == "fixed" and "DSPARK_ONLINE_SPS=off" in why


def test_seeded_rows_verify_the_full_block_whatever_the_plan():
    """plan(full_rows=...): the proposer pins seeded sampled requests to the full block, so how much of
    their random stream verification uses does not depend on the batch or on timings."""
    online = OnlineStepRate()
    for b in (2, 16):
        for _ in range(3):
            online.observe(2, b, 0.04 * b)   # a steep curve: the plan verifies nothing
    online.explore(2, 7)                     # the bucket's first drafted step explored already
    planner = VerifyPlanner("early_stop", None, online=online)
    conf = torch.full((2, 7), 0.6)
    assert planner.plan(conf) == [0, 0]
    assert planner.plan(conf, full_rows=[False, True]) == [0, 7]


def test_draft_gate_pairs_are_saved_with_the_curve_and_restart_warm(tmp_path):
    path = tmp_path / "online_sps.json"
    first = OnlineStepRate(path=path, key="k", save_every=1000)
    gate = DraftGate()
    VerifyPlanner("early_stop", None, online=first, gate=gate)
    clock = 0.0
    for i in range(40):   # drafting: 2 tokens in 45 ms; not: 1 in 30 ms
        drafted = gate.decide(1, clock)
        gate.emitted(2.0 if drafted else 1.0)
        clock += 0.045 if drafted else 0.030
        first.observe(1, 2 if drafted else 1, 0.04)
    assert len(gate.buckets[1].pairs) >= 8 and gate.buckets[1].ratio > 1.2
    first.save()
    logged: list[str] = []
    second = OnlineStepRate(path=path, key="k")
    assert second.load()
    restarted = DraftGate()
    VerifyPlanner("early_stop", None, online=second, gate=restarted, log=logged.append)
    saved, kept = restarted.buckets[1], gate.buckets[1]   # its first step already drafts
    assert len(saved.pairs) == len(kept.pairs) and math.isclose(saved.ratio, kept.ratio, rel_tol=1e-3)
    # ... and the probe interval's step length (a drafted step 1.5 skipped ones) with them.
    assert len(saved.lengths) == len(kept.lengths) and math.isclose(saved.length(True), 1.5, rel_tol=1e-3)
    assert restarted.decide(1, 0.0) and any("loaded the last run's pairs" in line for line in logged)
    # Pairs saved before lengths were (two numbers each) still load, without a length.
    data = json.loads(path.read_text())
    data["entries"]["k"]["gate"] = {"1": [pair[:2] for pair in data["entries"]["k"]["gate"]["1"]]}
    path.write_text(json.dumps(data))
    older, online = DraftGate(), OnlineStepRate(path=path, key="k", warn=pytest.fail)
    assert online.load()
    VerifyPlanner("early_stop", None, online=online, gate=older)
    assert len(older.buckets[1].pairs) == len(kept.pairs) and not older.buckets[1].lengths
    assert older.buckets[1].length(True) == 1.0
    # A damaged gate entry: one warning naming the file and key; the curve itself still loads.
    data = json.loads(path.read_text())
    data["entries"]["k"]["gate"] = {"1": [[1.0, "x"]]}
    path.write_text(json.dumps(data))
    warned: list[str] = []
    third = OnlineStepRate(path=path, key="k", warn=warned.append)
    assert third.load() and third.buckets
    fresh = DraftGate()
    VerifyPlanner("early_stop", None, online=third, gate=fresh)
    assert not fresh.buckets and len(warned) == 1
    assert str(path) in warned[0] and "'gate.1'" in warned[0] and "ignoring the saved pairs" in warned[0]


def test_exploring_steps_are_not_draft_gate_samples():
    """A step verifying a longer prefix to measure its cost is not what drafting costs once the curve
    is known: the gate values the planner's own plans only."""
    online = OnlineStepRate(explore_every=1000)
    gate = DraftGate()
    planner = VerifyPlanner("early_stop", None, online=online, gate=gate)
    conf = torch.full((1, 7), 0.9)
    assert planner.should_draft(1, 0.0) and planner.plan(conf) == [1]   # explores
    assert planner.should_draft(1, 0.5)      # closed the exploring step: not a sample, so drafts again
    assert gate.buckets[1].samples == {True: 0, False: 0}
    assert planner.plan(conf) == [0]          # planned (nothing measured beyond B = 1 yet)
    planner.should_draft(1, 0.55)
    assert gate.buckets[1].samples == {True: 1, False: 0}
