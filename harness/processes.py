"""Child processes that leave nothing behind: each in its own process group, all stopped on exit.

A vLLM engine is a process tree (API server or offline driver -> EngineCore -> workers). Every
server and engine script the tests and benchmarks start goes through `popen` / `run` here: a new
session (so one `killpg` reaches the whole tree), `PR_SET_PDEATHSIG` (the kernel signals it when
the starter dies, even by SIGKILL), and a registry that `stop_all` empties at interpreter exit and on
SIGTERM / SIGHUP (`install_signal_handlers`, called from tests/conftest.py and the
benchmarks). tests/vllm/test_nothing_left_behind.py kills a test run and checks.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from typing import Any

_GROUPS: set[int] = set()


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _group_states(pgids: set[int]) -> list[tuple[int, str]]:
    """(pid, state letter) of every process on the machine whose process group is in `pgids` (/proc)."""
    from pathlib import Path

    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command in parentheses: state, ppid, pgrp
        if int(fields[2]) in pgids:
            out.append((int(entry.name), fields[0]))
    return out


def group_members(pgids: set[int]) -> list[int]:
    """Every process on the machine whose process group is in `pgids` (from /proc)."""
    return [pid for pid, _ in _group_states(pgids)]


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: the group's leader is our
    child and stays a zombie until `Popen.wait` reaps it, after the stop (`killpg(pgid, 0)` alone
    said "alive" for the whole grace period, a minute per server stop)."""
    return any(state != "Z" for _, state in _group_states({pgid}))


def stop_group(pgid: int, grace: float = 30.0) -> None:
    """SIGTERM the whole group, SIGKILL what is still there after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        _GROUPS.discard(pgid)
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.2)
    if group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _GROUPS.discard(pgid)


def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen in a new process group, registered for `stop_all`."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)
    _GROUPS.add(proc.pid)
    return proc


def run(cmd: list[str], timeout: float | None = None, check: bool = False, capture_output: bool = False,
        text: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run in a new process group; the group (engine children included) is stopped when
    the command returns, times out or the caller is interrupted."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = popen(cmd, text=text, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc.pid, grace=5)
        proc.communicate()
        raise
    finally:
        stop_group(proc.pid, grace=10)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def stop_all() -> None:
    for pgid in list(_GROUPS):
        stop_group(pgid, grace=10)


def _on_signal(signum: int, frame: object) -> None:
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_signal_handlers() -> None:
    """Stop every registered group before this process dies of SIGTERM / SIGHUP (SIGINT: pytest
    unwinds its fixtures first, then exits through atexit)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


atexit.register(stop_all)
