"""benchmarks/kernels.py --smoke: the GPU benchmark script runs end to end on CPU (interpreter)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels_bench.json"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "kernels.py"), "--smoke",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "smoke" and len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["greedy_tokens_equal"] == 1.0 and row["sampled_tokens_equal"] == 1.0
        assert row["logprob_max_abs_diff"] < 1e-4 and row["probs_max_abs_diff"] < 1e-5
        for key in ("fused_greedy_ms", "fused_sample_ms", "fused_sample_probs_ms", "twin_sample_probs_ms",
                    "floor_ms", "floor_probs_ms"):
            assert row[key] > 0
    table = (tmp_path / "kernels_bench.md").read_text()
    assert "| B | V | r |" in table and table.count("\n| ") == 5
