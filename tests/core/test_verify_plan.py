"""The vLLM proposer's verify-length policy (engine-free): switches, step cost, planner, statistics."""
from __future__ import annotations

import os

import pytest
import torch

from dspark_plugin.errors import DSparkError
from dspark_plugin.policy.verify_planner import prefix_survival, schedule_verify_lengths, top_k_verify_lengths, unconstrained_budget
from dspark_plugin.policy.step_rate import SPSCurve, device_tag, engine_device_tag
from dspark_plugin.policy.engine_plan import (
    StepCost,
    VerifyPlanner,
    resolve_mode,
    settings_from_env,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Step time grows linearly in B: verifying a token costs 10% of a one-token step.
CURVE = SPSCurve.from_measurements([1, 64], [100.0, 100.0 / (1 + 0.1 * 63)])


def confidences(seed: int, R: int = 5, g: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(R, g, generator=gen) ** 0.25


def test_settings_from_env(tmp_path):
    assert settings_from_env({}).mode is None and settings_from_env({}).sps_path is None
    assert settings_from_env({"DSPARK_SCHEDULER": " Fixed "}).mode == "fixed"
    sps = tmp_path / "sps.json"
    sps.write_text("{}")
    s = settings_from_env({"DSPARK_SCHEDULER": "async", "DSPARK_SPS": str(sps)})
    assert (s.mode, s.sps_path) == ("async", str(sps))
    with pytest.raises(DSparkError, match="DSPARK_SCHEDULER: 'on' is not one of early_stop, async, fixed"):
        settings_from_env({"DSPARK_SCHEDULER": "on"})
    with pytest.raises(DSparkError, match=f"DSPARK_SPS: {tmp_path / 'nope.json'}: SPS file not found"):
        settings_from_env({"DSPARK_SPS": str(tmp_path / "nope.json")})


def test_resolve_mode_falls_back_to_fixed_with_a_reason():
    assert resolve_mode("fixed", CURVE, True) == ("fixed", None)
    assert resolve_mode(None, CURVE, True) == ("early_stop", None)
    assert resolve_mode("async", CURVE, True) == ("async", None)
    mode, why = resolve_mode(None, None, True)
    assert mode == "fixed" and "dspark profile --engine vllm" in why
    mode, why = resolve_mode("early_stop", CURVE, False)
    assert mode == "fixed" and "confidence head" in why


def test_step_cost_adds_the_drafter_time():
    cost = StepCost(CURVE, draft_s=0.005)
    for b in (1, 7, 40, 64):
        assert cost(b) == pytest.approx(1.0 / (1.0 / CURVE(b) + 0.005))
    assert torch.allclose(cost.table(3, 9), torch.tensor([cost(b) for b in range(3, 10)], dtype=torch.float64))
    assert torch.allclose(StepCost(CURVE).table(1, 64), CURVE.table(1, 64))


@pytest.mark.parametrize("seed", range(5))
def test_early_stop_plan_is_the_core_scheduler(seed):
    conf = confidences(seed)
    planner = VerifyPlanner("early_stop", CURVE)
    expected = schedule_verify_lengths(prefix_survival(conf.double()), StepCost(CURVE), "early_stop").tolist()
    assert planner.plan(conf) == expected
    assert 0 < sum(expected) < conf.numel()  # the curve makes it verify part of the block


def test_drafter_time_counts_from_the_next_step_and_lengthens_the_verify():
    conf = confidences(0, R=8)
    planner = VerifyPlanner("early_stop", CURVE)
    first = planner.plan(conf)
    planner.observe_draft_time(0.05)  # a drafter costing 5 target steps makes verifying cheap in relative terms
    second = planner.plan(conf)
    expected = schedule_verify_lengths(prefix_survival(conf.double()), StepCost(CURVE, 0.05)).tolist()
    assert second == expected
    assert all(b >= a for a, b in zip(first, second)) and sum(second) > sum(first)


def test_fixed_plan_and_statistics():
    logged: list[str] = []
    planner = VerifyPlanner("fixed", None, log=logged.append, log_every=2)
    assert planner.plan(confidences(0, R=3)) == [7, 7, 7]
    planner.record([1, 2], 7)
    assert planner.mean_verified == pytest.approx((21 + 3) / 5)
    assert logged == [planner.summary()]
    assert "mode fixed, 2 steps, mean verified length 4.80 of 7 per request, mean batch 2.5" in logged[0]


def test_async_plan_uses_the_budget_of_two_steps_ago():
    planner = VerifyPlanner("async", CURVE)
    steps = [confidences(s, R=4) for s in range(4)]
    got = [planner.plan(c) for c in steps]
    surv = [prefix_survival(c.double()) for c in steps]
    for t in range(2):  # no stale budget yet: the synchronous early stop
        assert got[t] == schedule_verify_lengths(surv[t], StepCost(CURVE)).tolist()
    for t in range(2, 4):
        k = unconstrained_budget(surv[t - 2], StepCost(CURVE))
        assert got[t] == top_k_verify_lengths(surv[t], k).tolist()


def test_planner_needs_a_curve_to_schedule():
    with pytest.raises(DSparkError, match="needs an SPS curve"):
        VerifyPlanner("early_stop", None)
    with pytest.raises(DSparkError, match="unknown mode"):
        VerifyPlanner("full_search", CURVE)  # not lossless: never offered to an engine


def test_vllm_cpu_device_tag_is_the_core_count():
    assert engine_device_tag("cpu", "vllm") == f"cpu:{os.cpu_count()}cores"
    assert engine_device_tag("cpu") == device_tag("cpu")


def test_cli_vllm_profile_reuses_the_cached_curve_without_an_engine(tmp_path, capsys):
    """A second `dspark profile --engine vllm` (or a restart) finds the curve under its key."""
    from dspark_plugin import cli
    from dspark_plugin.policy.step_rate import cache_key, find_sps_curve, target_fingerprint

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "llama"}')
    out = tmp_path / "sps.json"
    key = cache_key(target_fingerprint(target), engine_device_tag("cpu", "vllm"), "float32", "vllm")
    CURVE.save(out, key)
    SPSCurve.from_measurements([1], [1.0]).save(out, "some other target")
    assert cli.main(["profile", "--engine", "vllm", "--target", str(target), "--out", str(out)]) == 0
    assert "cached SPS curve" in capsys.readouterr().out
    # What the proposer looks up at start-up (the file holds two curves: the key picks ours).
    assert find_sps_curve(target, None, path=out, device="cpu", dtype=torch.float32, engine="vllm").sps == CURVE.sps
    assert cli.main(["profile", "--engine", "vllm", "--target", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope: key 'config.json'" in capsys.readouterr().err
