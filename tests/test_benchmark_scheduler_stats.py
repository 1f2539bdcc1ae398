"""The scheduler benchmark's paired-by-round statistics (benchmarks/vllm_scheduler.py): ratios are
taken inside each round, summarised by their geometric mean and a t interval, and the scheduler is
held against the better of no-spec and fixed block round by round."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
