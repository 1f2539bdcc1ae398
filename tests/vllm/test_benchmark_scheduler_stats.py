"""The scheduler benchmark's paired-by-round statistics (benchmarks/vllm_scheduler.py): ratios are
taken inside each round, summarised by their geometric mean and a t interval, and the scheduler is
held against the better of no-spec and fixed block round by round."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("vllm_scheduler_bench", REPO / "benchmarks" / "vllm_scheduler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(rounds: dict[str, list[float]]) -> dict:
    return {"runs": {name: {"16": {"output_tokens_per_s": sum(tps) / len(tps), "output_tokens_per_s_rounds": tps}}
                     for name, tps in rounds.items()}}


def test_ratios_are_paired_within_rounds(bench):
    # The machine ran at 100 then 200 tokens/s: each round the scheduler is 0.9x no-spec. Pooled means
    # would call that 0.9 too, but with a spread of 2x per configuration; pairs see no spread at all.
    r = result({"no-spec": [100.0, 200.0, 150.0], "dspark-fixed": [50.0, 100.0, 75.0],
                "dspark-scheduler": [90.0, 180.0, 135.0]})
    p = bench.paired(r, "dspark-scheduler", ["no-spec"], "16")
    assert p["ratios"] == pytest.approx([0.9] * 3)
    assert p["mean"] == pytest.approx(0.9) and p["low"] == pytest.approx(0.9) and p["high"] == pytest.approx(0.9)


def test_interval_is_students_t_over_log_ratios(bench):
    r = result({"no-spec": [100.0, 100.0, 100.0, 100.0], "dspark-scheduler": [110.0, 90.0, 100.0, 95.0]})
    p = bench.paired(r, "dspark-scheduler", ["no-spec"], "16")
    logs = [math.log(x) for x in (1.1, 0.9, 1.0, 0.95)]
    mean = sum(logs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 3)
    assert p["mean"] == pytest.approx(math.exp(mean))
    assert p["low"] == pytest.approx(math.exp(mean - 3.18 * sd / 2))
    assert p["low"] < 1 < p["high"]  # a 5% average loss is not distinguishable from none here


def test_scheduler_against_the_better_rival_each_round(bench):
    # Round 1 fixed wins (low load), round 2 no-spec wins: the scheduler must beat each round's winner.
    r = result({"no-spec": [100.0, 100.0], "dspark-fixed": [120.0, 60.0], "dspark-scheduler": [126.0, 95.0]})
    p = bench.paired(r, "dspark-scheduler", ["no-spec", "dspark-fixed"], "16")
    assert p["ratios"] == pytest.approx([1.05, 0.95])
    text = bench.table(r)
    assert "| 16 | 1.05 0.95 |" in text and "better of no-spec and dspark-fixed" in text


def test_no_interval_without_complete_rounds(bench):
    assert bench.paired(result({"no-spec": [100.0], "dspark-scheduler": [90.0]}), "dspark-scheduler",
                        ["no-spec"], "16") is None
    assert bench.paired(result({"no-spec": [100.0, 90.0], "dspark-scheduler": [90.0]}), "dspark-scheduler",
                        ["no-spec"], "16") is None  # a failed server start: rounds no longer line up


def test_report_rewrites_the_summary_from_saved_results(bench, tmp_path):
    import json

    r = result({"no-spec": [100.0, 120.0], "dspark-fixed": [60.0, 70.0], "dspark-scheduler": [104.0, 114.0]})
    r.update(target_name="t", drafter_name="d", date="2026-11-29", command="python benchmarks/vllm_scheduler.py",
             machine="m", max_tokens=64, sps="sps.json")
    (tmp_path / "results.json").write_text(json.dumps(r))
    assert bench.main(["--report", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["paired"]["dspark-scheduler/no-spec"]["16"]["ratios"] == pytest.approx([1.04, 0.95])
    assert saved["paired"]["dspark-scheduler/best-of-no-spec+dspark-fixed"]["16"]["mean"] == pytest.approx(
        math.sqrt(1.04 * 0.95))
    assert "| dspark-scheduler | 16 | 109.0 |" in (tmp_path / "summary.md").read_text()
