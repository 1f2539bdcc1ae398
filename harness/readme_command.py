"""The README's main command, as printed: parsed from README.md and run with bash.

Shared by tests/vllm/test_vllm_restart.py and benchmarks/vllm_bench_serve.py, so both run exactly
what a user copies from the README's "## The main command" section, plus `--port`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from harness.vllm_serving import VllmServer

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_main_command(readme: Path = README) -> tuple[str, dict, str]:
    """(the serve command, the chat request's JSON body, the documented completion) from the
    "The main command" section."""
    text = readme.read_text()
    section = text.split("## The main command", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
    script = next(body for lang, body in blocks if lang == "bash" and "dspark-vllm serve" in body)
    serve = re.search(r"^dspark-vllm serve (?:.*\\\n)*.*$", script, flags=re.M).group(0)
    body = re.search(r"/v1/chat/completions .*?-d '(.*?)'", script, flags=re.S).group(1)
    answer = next(body for lang, body in blocks if lang == "")
    return serve, json.loads(body), " ".join(answer.split())


class ShellServer(VllmServer):
    """A printed command line, run with bash in `cwd` with the user's environment (no launcher
    defaults, no VLLM_/DSPARK_ settings of this process), plus `--port`. The learned step-rate
    curve goes to `cwd/dspark-cache` (the first start in a fresh `cwd` learns from nothing)."""

    def __init__(self, command: str, cwd: Path, log: Path, port: int | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "DSPARK_"))}
        env["DSPARK_CACHE_DIR"] = str(Path(cwd) / "dspark-cache")
        super().__init__("", log, port=port, env=env, cwd=cwd)
        self.printed = command

    def command(self) -> list[str]:
        return ["bash", "-c", f"{self.printed} --port {self.port}"]


def work_tree(root: Path, target: Path) -> Path:
    """A directory laid out as the README assumes (work_cache/smollm2-135m, drafters/), whose own
    ./work_cache/vllm_cache starts empty."""
    (root / "work_cache").mkdir(parents=True, exist_ok=True)
    link = root / "work_cache" / "smollm2-135m"
    if not link.exists():
        link.symlink_to(target)
    if not (root / "drafters").exists():
        (root / "drafters").symlink_to(REPO / "drafters")
    return root
