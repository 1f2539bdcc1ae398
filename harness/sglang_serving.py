"""Helpers shared by tests/sglang/ and benchmarks/sglang_serving.py: a server started through the
`dspark-sglang` launcher on 127.0.0.1, and the wait for it (no SGLang import here; not packaged)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Mapping

from harness import processes
from harness.vllm_serving import free_port

__all__ = ["free_port", "launch", "wait_healthy"]


def launch(target: str | Path, port: int, extra: list[str], log: IO[str],
           env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """`python -m dspark_plugin.sglang.launcher --model-path TARGET --host 127.0.0.1 --port PORT *extra`, its
    output into `log`. SGLANG_USE_CPU_ENGINE and SGLANG_PLUGINS are dropped from the environment: the
    launcher sets up CPU serving itself, and the plugin must be loaded by its entry point."""
    env = dict(os.environ if env is None else env)
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    env.pop("SGLANG_PLUGINS", None)
    return processes.popen([sys.executable, "-m", "dspark_plugin.sglang.launcher", "--model-path", str(target),
                            "--host", "127.0.0.1", "--port", str(port), *extra], stdout=log, stderr=log, env=env)


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 420.0) -> float:
    """Seconds until /health answers 200; raises if the server exits first or `timeout` passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"no healthy server on port {port} after {timeout} s")
