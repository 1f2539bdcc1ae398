"""`dspark eval` and `dspark generate` end to end through the installed console script."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_plugin.checkpoint.deepspec import save_drafter
from tiny import save_tiny_target, tiny_drafter


def dspark_exe() -> str:
    exe = Path(sys.executable).parent / "dspark"
    return str(exe) if exe.exists() else shutil.which("dspark")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    target = save_tiny_target(root / "target", init=0.02)
    save_drafter(tiny_drafter(target, "rnn"), root / "drafter")
    data = root / "mixed.jsonl"
    rows = [{"turns": ["w10 w11 w12", "second turn"]}, {"prompt": "w20 w21"}, {"question": "w30 w31 w32 w33"},
            {"instruction": "w40 w41", "instances": [{"input": "w42", "output": "x"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, data


def test_eval_console_script(dirs):
    root, data = dirs
    out = root / "report.json"
    proc = subprocess.run([dspark_exe(), "eval", "--target", str(root / "target"), "--drafter", str(root / "drafter"),
                           "--data", str(data), "--limit", "4", "--max-new-tokens", "24", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "tau=" in proc.stdout and "greedy-identical=yes" in proc.stdout
    assert "prompt" in proc.stderr  # tqdm progress bar over prompts
    report = json.loads(out.read_text())["reports"][0]
    assert report["dataset"] == "mixed" and report["prompts"] == 4 and report["greedy_identical"] is True
    assert report["tau"] >= 1.0 and len(report["acceptance"]) == 7
    assert report["tokens_per_s_dspark"] > 0 and report["tokens_per_s_target"] > 0


def test_eval_sampling_reports_no_identity(dirs):
    root, data = dirs
    out = root / "sampled.json"
    proc = subprocess.run([dspark_exe(), "eval", "--target", str(root / "target"), "--drafter", str(root / "drafter"),
                           "--data", str(data), "--limit", "2", "--max-new-tokens", "16", "--temperature", "1.0",
                           "--seed", "3", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["reports"][0]["greedy_identical"] is None


def test_generate_console_script(dirs):
    root, _ = dirs
    proc = subprocess.run([dspark_exe(), "generate", "--target", str(root / "target"), "--drafter",
                           str(root / "drafter"), "--prompt", "w10 w11", "--max-new-tokens", "12"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stdout and "DSpark tau=" in proc.stdout


def test_eval_with_confidence_scheduler_stays_identical(dirs, tmp_path):
    root, data = dirs
    out = root / "scheduled.json"
    env = dict(__import__("os").environ, DSPARK_CACHE_DIR=str(tmp_path))  # SPS measured and cached here
    proc = subprocess.run([dspark_exe(), "eval", "--target", str(root / "target"), "--drafter", str(root / "drafter"),
                           "--data", str(data), "--limit", "3", "--max-new-tokens", "24", "--scheduler", "early_stop",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["args"]["scheduler"] == "early_stop" and report["reports"][0]["greedy_identical"] is True
    assert (tmp_path / "sps.json").is_file()
