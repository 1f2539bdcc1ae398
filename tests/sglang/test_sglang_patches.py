"""The SGLang adapter's patch index (dspark_plugin/sglang/patches/) and registration: every patch
documents itself, its upstream diff in patches/ applies to the installed SGLang, it installs where
its scope says, once, can be switched off by name; `register()` is idempotent and registers the
speculative algorithm PLUGIN_DSPARK once, leaving SGLang's native DSPARK alone.

SGLang state (patched attributes, the algorithm registry) is process-global, so registration runs
in a subprocess per case (importing SGLang: ~15-30 s each on the 2-core machine). Skips where SGLang
is not installed (the vLLM venv runs the same tests/ tree)."""
from __future__ import annotations

import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dspark_plugin.sglang.versions import installed_sglang


# Asked of the installed distributions, not the import system: under pytest this directory
# (tests/sglang/) can itself be found as a namespace package named `sglang`.
if installed_sglang().version is None:
    pytest.skip("sglang is not installed (the SGLang tests run in their own venv, .venv-sglang)",
                allow_module_level=True)

import torch  # noqa: E402

from dspark_plugin.errors import DSparkError  # noqa: E402
from dspark_plugin.sglang import launcher, patches  # noqa: E402
from dspark_plugin.sglang.patches import cpu_assign_req_to_token_pool  # noqa: E402
from dspark_plugin.patching import ENV_DISABLE, disabled_patches  # noqa: E402
from harness import processes  # noqa: E402

DIFFS = Path(__file__).resolve().parents[2] / "patches"
CPU_HOST = not torch.cuda.is_available()


@pytest.mark.parametrize("name", patches.INDEX)
def test_every_patch_documents_itself(name):
    module = patches.module(name)
    doc = module.__doc__ or ""
    for word in ("Replaces", "Why", "Upstream", "Delete when", "Scope"):
        assert word in doc, f"{name}: docstring lacks {word!r}"
    assert module.NAME == name and module.SCOPE == "every server" and module.SCOPE in doc.replace("\n", " ")
    assert callable(module.applies) and callable(module.install) and module.REPLACES
    named = re.findall(r"patches/(sglang-[a-z0-9.-]+\.diff)", doc)
    assert named and all((DIFFS / d).is_file() for d in named), (name, named)
    assert f"| {name} " in patches.__doc__, f"{name} is missing from the index table"


def _diff_files(diff: Path) -> list[str]:
    return re.findall(r"^\+\+\+ b/(\S+)$", diff.read_text(), flags=re.M)


@pytest.mark.parametrize("diff", sorted(p.name for p in DIFFS.glob("sglang-0.5.23-*.diff")))
def test_upstream_diff_applies_to_the_installed_sglang(tmp_path, diff):
    """`git apply --check` against copies of site-packages' files (site-packages may sit inside this
    repository's work tree, where git would apply relative to the repository instead), then compile."""
    import sglang

    root = Path(sglang.__file__).resolve().parents[1]
    files = _diff_files(DIFFS / diff)
    assert files
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tmp_path / rel)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    check = subprocess.run(["git", "apply", "--check", "-v", str(DIFFS / diff)], cwd=tmp_path, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", str(DIFFS / diff)], cwd=tmp_path, check=True)
    for rel in files:
        py_compile.compile(str(tmp_path / rel), doraise=True)


def test_unknown_patch_name_is_refused_naming_the_variable():
    assert disabled_patches(patches.INDEX, {ENV_DISABLE: " cpu_rotary_native "}) == {"cpu_rotary_native"}
    with pytest.raises(DSparkError, match=ENV_DISABLE) as err:
        disabled_patches(patches.INDEX, {ENV_DISABLE: "cpu_rotary_native,no_such_patch"})
    assert "no_such_patch" in str(err.value)


def test_torch_slot_assignment_follows_the_kernel_contract():
    req_to_token = torch.full((4, 12), -1, dtype=torch.int32)
    pool_rows = torch.tensor([2, 0, 3])
    start, end = torch.tensor([3, 0, 5]), torch.tensor([5, 4, 5])   # the third request writes nothing
    locs = torch.arange(100, 106, dtype=torch.int64)
    cpu_assign_req_to_token_pool.assign_req_to_token_pool_torch(pool_rows, req_to_token, start, end, locs, 3)
    want = torch.full((4, 12), -1, dtype=torch.int32)
    want[2, 3:5] = torch.tensor([100, 101], dtype=torch.int32)
    want[0, 0:4] = torch.tensor([102, 103, 104, 105], dtype=torch.int32)
    assert torch.equal(req_to_token, want)


@pytest.mark.parametrize("window", [None, 6])
def test_extend_attention_equals_sglang_on_the_extend_rows(window):
    """Three sequences (no prefix, a verify window after a prefix, one token after a long prefix), their
    K/V at scattered pool slots, grouped heads: the patch's rows equal SGLang's kept rows (a sliding
    window goes to SGLang's own method through the wrapper)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from dspark_plugin.sglang.patches import cpu_extend_attention

    sglang_method = getattr(TorchNativeAttnBackend._run_sdpa_forward_extend, "__wrapped__",
                            TorchNativeAttnBackend._run_sdpa_forward_extend)
    patched = cpu_extend_attention._make_wrapper(sglang_method)
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, pool = 6, 2, 16, 160
    prefix, extend = torch.tensor([0, 5, 40]), torch.tensor([4, 8, 1])
    seq_lens = prefix + extend
    req_to_token = torch.randperm(pool, generator=g)[:3 * 41].view(3, 41).to(torch.int32)
    req_pool_indices = torch.tensor([2, 0, 1])
    k_cache, v_cache = (torch.randn(pool, kv_heads, dim, generator=g) for _ in range(2))
    query = torch.randn(int(extend.sum()), heads, dim, generator=g)
    args = (k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, prefix, extend)
    kwargs = dict(scaling=dim ** -0.5, enable_gqa=True, causal=True, sliding_window_size=window)
    host = TorchNativeAttnBackend.__new__(TorchNativeAttnBackend)   # only its static mask helper is used
    want = sglang_method(host, query, torch.zeros_like(query), *args, **kwargs)
    got = patched(host, query, torch.zeros_like(query), *args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_launcher_cpu_arguments_fill_defaults_keep_user_flags_and_rename_dspark():
    argv = ["--model-path", "m", "--dtype", "bfloat16", "--speculative-algorithm", "dspark",
            "--speculative-draft-model-path", "d"]
    out = launcher.cpu_arguments(argv)
    assert launcher.flag_value(out, "--dtype") == "bfloat16"          # the user's choice wins
    assert launcher.flag_value(out, "--speculative-algorithm") == "PLUGIN_DSPARK"
    for flag, value in launcher.CPU_FLAGS.items():
        if flag != "--dtype":
            assert launcher.flag_value(out, flag) == ("" if value is None else value), flag
    assert launcher.cpu_arguments(["--speculative-algorithm=DSPARK"])[0] == "--speculative-algorithm=PLUGIN_DSPARK"
    assert launcher.cpu_arguments(["--speculative-algorithm", "NGRAM"])[:2] == ["--speculative-algorithm", "NGRAM"]
    assert launcher.serves_on_cpu([], cuda_available=False) and not launcher.serves_on_cpu([], cuda_available=True)
    assert launcher.serves_on_cpu(["--device", "cpu"], cuda_available=True)
    assert not launcher.serves_on_cpu(["--device=cuda"], cuda_available=False)
    env = launcher.cpu_environment({"OMP_NUM_THREADS": "2"})
    assert env["OMP_NUM_THREADS"] == "2" and env["SGLANG_NATIVE_MOVE_KV_CACHE"] == "1"


# Registers the plugin twice as SGLang's load_plugins would, then records which attributes each patch
# replaced, what a second install does, and what the algorithm registry answers.
SCRIPT = """
import importlib, json, logging
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
log = logging.getLogger("sglang.dspark_plugin")
log.addHandler(handler)
log.setLevel(logging.INFO)
from dspark_plugin.sglang import patches, plugin
from dspark_plugin.patching import is_patched

def resolve(target):
    module, attrs = target.split(":")
    owner = importlib.import_module(module)
    *path, attr = attrs.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr

plugin.register()
plugin.register()
result = {"installed": patches.install_all(), "active": plugin.is_active(), "replaced": {}}
for name in patches.INDEX:
    for target in patches.module(name).REPLACES:
        result["replaced"][target] = is_patched(*resolve(target))
result["second_install"] = {}
for name, on in result["installed"].items():
    if on:
        try:
            patches.module(name).install()
            result["second_install"][name] = "installed again"
        except RuntimeError as e:
            result["second_install"][name] = str(e)
from sglang.srt.layers.rotary_embedding import base
result["rotary_is_cpu"] = base._is_cpu
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from dspark_plugin.sglang import algorithm
algo = SpeculativeAlgorithm.from_string("plugin_dspark")
result["algorithm"] = [type(algo).__name__, algo.name, algo.supports_overlap, algo.carries_draft_hidden_states(),
                       algo.is_dspark(), algo.is_speculative()]
result["native"] = repr(SpeculativeAlgorithm.from_string("DSPARK"))
result["register_again"] = algorithm.register_algorithm()
result["log"] = lines
print(json.dumps(result))
"""


def run_case(disable: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", SGLANG_PLUGINS="none")   # the script registers the plugin itself
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    env.pop(ENV_DISABLE, None)
    if disable is not None:
        env[ENV_DISABLE] = disable
    proc = processes.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_case() -> dict:
    return run_case(None)


@pytest.mark.skipif(not CPU_HOST, reason="the CPU patches apply on a host without CUDA only")
def test_registration_installs_every_cpu_patch_once(default_case):
    assert default_case["installed"] == dict.fromkeys(patches.INDEX, True)
    for name in patches.INDEX:
        for target in patches.module(name).REPLACES:
            assert default_case["replaced"][target] == name, target
    assert default_case["rotary_is_cpu"] is True
    assert ("dspark-plugin patches: cpu_rotary_native on, cpu_assign_req_to_token_pool on, cpu_kv_copy_warmup on, "
            "cpu_extend_attention on" in default_case["log"])
    registered = [line for line in default_case["log"] if line.startswith("dspark-plugin: registered ")]
    assert len(registered) == 1   # register() twice, one registration


def test_a_second_install_raises_from_the_guard(default_case):
    for name, outcome in default_case["second_install"].items():
        assert "is already patched by" in outcome and "would stack on it" in outcome, (name, outcome)


def test_the_algorithm_is_registered_once_and_native_dspark_is_untouched(default_case):
    assert default_case["active"] is True
    assert default_case["algorithm"] == ["DSparkPluginAlgo", "PLUGIN_DSPARK", False, False, False, True]
    assert default_case["native"] == "<SpeculativeAlgorithm.DSPARK: 3>"
    assert default_case["register_again"] is False


@pytest.mark.skipif(not CPU_HOST, reason="the CPU patches apply on a host without CUDA only")
@pytest.mark.parametrize("group", [patches.INDEX[0::2], patches.INDEX[1::2]], ids=["even", "odd"])
def test_each_patch_can_be_switched_off_by_name(group):
    """Every patch is switched off in one of two server processes (one process each: ~15 s of
    importing SGLang), and the others stay on there."""
    got = run_case(",".join(group))
    line = next(line for line in got["log"] if "dspark-plugin patches:" in line)
    for name in patches.INDEX:
        if name in group:
            assert got["installed"][name] is False and f"{name} off (DSPARK_DISABLE_PATCHES)" in line, name
            for target in patches.module(name).REPLACES:
                assert got["replaced"][target] is None, target
        else:
            assert got["installed"][name] is True, name
