"""Runs the kernel test files (tests/kernels/test_kernels_*.py) under TRITON_INTERPRET=1 in a subprocess.

See tests/kernels/test_kernels_rng.py for why they cannot share this pytest process.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from interpreted import interpreted_kernel_files

HERE = Path(__file__).resolve().parent


def test_kernel_suite_under_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("already interpreted: the kernel files run directly in this process")
    pytest.importorskip("triton")
    files = [str(p) for p in interpreted_kernel_files()]
    env = dict(os.environ, TRITON_INTERPRET="1", DSPARK_FORCE_TRITON="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = re.search(r"(\d+) passed", proc.stdout)
    assert summary and int(summary.group(1)) >= 40, tail
    assert " skipped" not in proc.stdout.splitlines()[-1], tail
    print(proc.stdout.splitlines()[-1])
