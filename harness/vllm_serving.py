"""Start and talk to a real `vllm serve` (through the `dspark-vllm` launcher) on 127.0.0.1.

Used by the end-to-end tests and by benchmarks/vllm_serving.py. Standard library only, so the
client side adds no dependency; the server is the real vLLM process tree.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from harness import processes

SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens")
GEN_COUNTERS = ("vllm:generation_tokens",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """One `vllm serve` process group; `start()` blocks until /health answers or the server dies."""

    def __init__(
        self,
        model: str | Path,
        log_path: str | Path,
        speculative_config: dict[str, Any] | None = None,
        extra_args: list[str] | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        launcher: list[str] | None = None,
    ):
        self.model = str(model)
        self.log_path = Path(log_path)
        self.speculative_config = speculative_config
        self.extra_args = list(extra_args or [])
        self.port = port or free_port()
        self.env = env
        self.cwd = cwd
        # The dspark-vllm launcher of this interpreter, or another (an installed console script).
        self.launcher = list(launcher or [sys.executable, "-m", "dspark_plugin.vllm.launcher"])
        self.proc: subprocess.Popen | None = None
        self.startup_s = float("nan")  # seconds from the process start to the first healthy /health

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [*self.launcher, "serve", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--served-model-name", "target", *self.extra_args]
        if self.speculative_config is not None:
            cmd += ["--speculative-config", json.dumps(self.speculative_config)]
        return cmd

    def start(self, timeout: float = 600.0) -> "VllmServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        env = dict(os.environ if self.env is None else self.env)
        t0 = time.monotonic()
        # Own process group, stopped with this process (harness/processes.py).
        self.proc = processes.popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float = 600.0) -> int:
        """For servers expected to refuse to start: the exit code (the server is killed on timeout)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            proc = processes.run(self.command(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                 env=dict(os.environ if self.env is None else self.env))
        return proc.returncode

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        # The whole group, also when the API server already exited (its engine may not have).
        processes.stop_group(self.proc.pid, grace=60)
        self.proc.wait(timeout=30)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- client --------------------------------------------------------------------------------
    def post(self, path: str, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def complete(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, **extra: Any) -> str:
        body = {"model": "target", "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                **extra}
        return self.post("/v1/completions", body)["choices"][0]["text"]

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return parse_metrics(r.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value summed over label sets} (counters without `_total`)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name = m.group(1).removesuffix("_total")
        try:
            out[name] = out.get(name, 0.0) + float(m.group(3))
        except ValueError:
            continue
    return out


def acceptance_length(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean tokens per verification step (accepted drafts + 1) between two /metrics snapshots."""
    drafts = after.get("vllm:spec_decode_num_drafts", 0.0) - before.get("vllm:spec_decode_num_drafts", 0.0)
    accepted = (after.get("vllm:spec_decode_num_accepted_tokens", 0.0)
                - before.get("vllm:spec_decode_num_accepted_tokens", 0.0))
    return None if drafts <= 0 else 1.0 + accepted / drafts
