"""benchmarks/acceptance.py end to end on tiny real models (reference engine: `dspark eval`)."""
import json
import subprocess
import sys
from pathlib import Path

from dspark_plugin.checkpoint.deepspec import save_drafter
from tiny import save_tiny_target, tiny_drafter

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "acceptance.py"


def test_acceptance_benchmark_reference_engine(tmp_path):
    target = save_tiny_target(tmp_path / "target", init=0.02)
    save_drafter(tiny_drafter(target, "vanilla"), tmp_path / "dspark")
    save_drafter(tiny_drafter(target, "none", seed=2), tmp_path / "dflash")
    data = tmp_path / "data"
    data.mkdir()
    for name, words in (("set_a", "w10 w11 w12"), ("set_b", "w20 w21")):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"{words} w{30 + i}"}) + "\n" for i in range(3)))
    out = tmp_path / "acc.json"
    cmd = [sys.executable, str(SCRIPT), "--engine", "reference", "--target", str(tmp_path / "target"),
           "--drafters", str(tmp_path / "dspark"), str(tmp_path / "dflash"), "--baseline", str(tmp_path / "dflash"),
           "--data-dir", str(data), "--datasets", "set_a", "set_b", "--prompts", "2", "--max-new-tokens", "12",
           "--temperatures", "0", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["table"]
    assert len(rows) == 2 * 2 * 2  # drafters x datasets x temperatures
    greedy = [r for r in rows if r["temperature"] == 0]
    assert all(r["greedy_identical"] is True for r in greedy)
    assert all(r["greedy_identical"] is None for r in rows if r["temperature"] == 1)
    assert all(r["tau"] >= 1.0 for r in rows)
    base = [r for r in rows if r["drafter"] == str(tmp_path / "dflash")]
    assert all(r["vs_dflash"] == 1.0 for r in base)
    per_pos = res["results"][str(tmp_path / "dspark")][0]["cumulative_acceptance"]
    assert len(per_pos) == 7 and all(a >= b for a, b in zip(per_pos, per_pos[1:]))
