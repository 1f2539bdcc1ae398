"""Apply a diff from patches/ to copies of the installed vLLM files it touches (no pytest import)."""
from __future__ import annotations

import py_compile
import shutil
import subprocess
from pathlib import Path


def apply_to_copy(patch: Path, rel: str, workdir: Path, *others: str) -> str:
    """`git apply --check`, then apply, `patch` to copies of site-packages' `rel` (and `others`, the
    other files it touches); -> the patched text of `rel`."""
    import vllm

    root = Path(vllm.__file__).resolve().parents[1]
    for name in (rel, *others):
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, workdir / name)
    check = subprocess.run(["git", "apply", "--check", "-v", str(patch)], cwd=workdir, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", str(patch)], cwd=workdir, check=True)
    for name in (rel, *others):
        py_compile.compile(str(workdir / name), doraise=True)
    return (workdir / rel).read_text()
