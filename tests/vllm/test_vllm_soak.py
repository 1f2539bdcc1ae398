"""The soak of #21, three minutes of it: `benchmarks/soak.py` run as BENCHMARKS.md prints it, shorter.

A DSpark server (the README's form, default settings: learned step rate, draft gate, context lookup)
under a reproducible mix of 20 request kinds from 16 client threads, then a plain server answers the
greedy pool. The script's own checks decide its exit status (no 5xx or connection failure, healthy
at the end, every greedy answer identical to the plain server's, `min_p` / `logit_bias` refused with
400, resident memory at the end within 10% of its value after the first minute, spec-decode
counters moving); this test asserts that status and that the run was a real one (enough requests of
every kind, greedy answers compared, drafts accepted). Eager servers: the compiled path's restarts
are tests/vllm/test_vllm_restart.py's subject, and a compile would cost CI minutes here.
"""
from __future__ import annotations

import json
import sys

import pytest

from harness import processes
from harness.vllm_testing import REPO, smollm2_target, vllm_env

pytestmark = pytest.mark.slow

MINUTES = 3
CONCURRENCY = 16


def test_three_minute_soak_at_concurrency_16_has_no_failure(tmp_path):
    out = tmp_path / "soak"
    cmd = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--target", str(smollm2_target()),
           "--minutes", str(MINUTES), "--concurrency", str(CONCURRENCY), "--server-args=--enforce-eager",
           "--out", str(out)]
    proc = processes.run(cmd, capture_output=True, text=True, timeout=1800, env=vllm_env())
    table = (out / "table.md").read_text() if (out / "table.md").exists() else ""
    assert proc.returncode == 0, f"soak failed:\n{table}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads((out / "results.json").read_text())
    assert result["failures"] == []
    kinds = result["status_by_kind"]
    # A run that sent little or skipped kinds would pass the script's checks vacuously.
    assert result["requests"] >= 100, result["requests"]
    assert len(kinds) >= 15, sorted(kinds)
    assert result["greedy_checked"] >= 20
    assert kinds["refused-min-p"].get("400", 0) + kinds["refused-logit-bias"].get("400", 0) >= 2
    assert result["counters"]["accepted"] > 0
    assert len(result["memory_mib"]) >= MINUTES * 60 // 5 - 2
