"""SPS curve: isotonic smoothing, interpolation, JSON cache, profiling a real tiny HF target."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from scipy.optimize import isotonic_regression

from dspark_plugin import cli
from dspark_plugin.errors import DSparkError
from dspark_plugin.policy.step_rate import (
    SPSCurve,
    cache_key,
    isotonic_non_increasing,
    load_or_measure,
    measure_sps,
    profile_hf_target,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", range(10))
def test_pava_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    y = np.sort(rng.uniform(1, 100, 12))[::-1] + rng.normal(0, 15, 12)
    w = rng.uniform(0.5, 3, 12)
    ours = np.array(isotonic_non_increasing(y.tolist(), w.tolist()))
    ref = isotonic_regression(y, weights=w, increasing=False).x
    assert np.allclose(ours, ref)
    assert (np.diff(ours) <= 1e-12).all()


def test_pava_keeps_monotone_input():
    y = [9.0, 7.0, 7.0, 3.0]
    assert isotonic_non_increasing(y) == y
    assert isotonic_non_increasing([1.0, 3.0]) == [2.0, 2.0]


def test_curve_smooths_interpolates_and_extrapolates():
    curve = SPSCurve.from_measurements([8, 1, 2, 4, 4], [5.0, 10.0, 11.0, 8.0, 7.0])
    assert curve.batch_sizes == [1, 2, 4, 8]
    assert curve.raw_sps == [10.0, 11.0, 7.5, 5.0]  # duplicates averaged
    assert curve.sps == [10.5, 10.5, 7.5, 5.0]
    # Step time (1/SPS) is linear between points: B = 6 lies halfway between 1/7.5 and 1/5.
    assert curve(6) == pytest.approx(1.0 / (0.5 / 7.5 + 0.5 / 5.0))
    tab = curve.table(1, 40)
    assert tab[0].item() == pytest.approx(10.5)
    assert (tab[1:] <= tab[:-1] + 1e-12).all()  # non-increasing, also beyond the last point
    assert curve(40) < curve(8)
    assert curve(0) == pytest.approx(10.5)  # below the first point: held constant
    assert SPSCurve.from_measurements([4], [3.0])(100) == pytest.approx(3.0)


def test_curve_rejects_bad_values():
    with pytest.raises(DSparkError, match="non-increasing"):
        SPSCurve([1, 2], [1.0, 2.0])
    with pytest.raises(DSparkError, match="strictly increasing"):
        SPSCurve([2, 1], [2.0, 1.0])
    with pytest.raises(DSparkError, match="finite and positive"):
        SPSCurve([1, 2], [0.0, 0.0])


def test_cache_file_keeps_entries_and_reports_bad_files(tmp_path):
    path = tmp_path / "sps.json"
    a = SPSCurve.from_measurements([1, 8], [10.0, 4.0], meta={"engine": "reference"})
    b = SPSCurve.from_measurements([1, 8], [20.0, 9.0])
    a.save(path, "k1")
    b.save(path, "k2")
    assert SPSCurve.load(path, "k1").sps == a.sps
    assert SPSCurve.load(path, "k2").to_dict() == b.to_dict()
    with pytest.raises(DSparkError, match="holds 2 SPS curves"):
        SPSCurve.load(path)
    with pytest.raises(DSparkError, match="key 'k3'"):
        SPSCurve.load(path, "k3")

    calls = []
    curve, cached = load_or_measure(path, "k2", lambda: calls.append(1))
    assert cached and not calls and curve.sps == b.sps

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DSparkError, match="bad.json: not valid JSON"):
        SPSCurve.load(bad)
    bad.write_text(json.dumps({"version": 1, "entries": {"x": {"batch_sizes": [1]}}}))
    with pytest.raises(DSparkError, match=r"bad.json\[x\]: key 'sps'"):
        SPSCurve.load(bad)
    with pytest.raises(DSparkError, match="not found"):
        SPSCurve.load(tmp_path / "missing.json")


def test_measure_sps_on_a_known_cost():
    # A step whose cost grows with B: measured SPS must come out non-increasing and about right.
    def step(b: int) -> None:
        time.sleep(0.002 + 0.0005 * b)

    curve = measure_sps(step, (1, 4, 16), repeats=3, warmup=0)
    assert curve.sps[0] >= curve.sps[1] >= curve.sps[2]
    assert 1.0 / curve.sps[2] >= 0.010  # at least the slept 10 ms


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    out = tmp_path_factory.mktemp("target")
    model.save_pretrained(out)
    return out


def test_profile_tiny_hf_target_is_monotone_and_cached(tiny_target_dir, tmp_path):
    cache = tmp_path / "cache" / "sps.json"
    sizes = (1, 2, 4, 8, 16, 32)
    curve, cached = profile_hf_target(tiny_target_dir, cache, batch_sizes=sizes, repeats=2, context_len=16)
    assert not cached
    assert curve.batch_sizes == list(sizes)
    assert all(s2 <= s1 for s1, s2 in zip(curve.sps, curve.sps[1:]))
    assert curve.meta["engine"] == "reference" and curve.meta["target"] == str(tiny_target_dir.resolve())

    t0 = time.perf_counter()
    again, cached = profile_hf_target(tiny_target_dir, cache, batch_sizes=sizes, repeats=2, context_len=16)
    assert cached and again.to_dict() == curve.to_dict()
    assert time.perf_counter() - t0 < 1.0  # no model load, no timing

    # Another dtype is another key in the same file; the first entry stays.
    other, cached = profile_hf_target(tiny_target_dir, cache, batch_sizes=(1, 4), repeats=1, context_len=8,
                                      dtype=torch.float64)
    assert not cached
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 2 and any("float64" in k for k in entries) and any("float32" in k for k in entries)


def test_profile_missing_target(tmp_path):
    with pytest.raises(DSparkError, match="config.json"):
        profile_hf_target(tmp_path, tmp_path / "sps.json")


def test_cli_profile_writes_curve(tiny_target_dir, tmp_path, capsys):
    out = tmp_path / "curve.json"
    rc = cli.main(["profile", "--target", str(tiny_target_dir), "--out", str(out), "--batch-sizes", "1,4,16",
                   "--repeats", "1", "--context-len", "8", "--threads", "1"])
    assert rc == 0
    curve = SPSCurve.load(out)
    assert curve.batch_sizes == [1, 4, 16]
    printed = capsys.readouterr().out
    assert "measured" in printed and str(out) in printed
    # A second run reuses the file.
    assert cli.main(["profile", "--target", str(tiny_target_dir), "--out", str(out), "--batch-sizes", "1,4,16",
                     "--threads", "1"]) == 0
    assert "cached" in capsys.readouterr().out
    assert cli.main(["profile", "--target", str(tiny_target_dir), "--out", str(out), "--batch-sizes", "1,2",
                     "--repeats", "1", "--force", "--threads", "1"]) == 0
    assert "measured" in capsys.readouterr().out and SPSCurve.load(out).batch_sizes == [1, 2]
    assert cli.main(["profile", "--target", str(tmp_path / "nope"), "--out", str(out)]) == 2


def test_cache_key_names_target_device_dtype():
    k = cache_key("/t@abc", "cpu:2threads", torch.bfloat16)
    assert k == "reference|/t@abc|cpu:2threads|bfloat16"


def test_find_sps_curve_order(tiny_target_dir, tmp_path, monkeypatch):
    from dspark_plugin.policy.step_rate import SPS_FILE_NAME, device_tag, find_sps_curve, target_fingerprint

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    drafter_dir = tmp_path / "drafter"
    drafter_dir.mkdir()
    assert find_sps_curve(tiny_target_dir, drafter_dir) is None
    key = cache_key(target_fingerprint(tiny_target_dir), device_tag("cpu"), torch.float32)
    SPSCurve.from_measurements([1, 8], [30.0, 10.0]).save(tmp_path / "cache" / "sps.json", key)
    assert find_sps_curve(tiny_target_dir, drafter_dir).sps == [30.0, 10.0]
    SPSCurve.from_measurements([1, 8], [20.0, 10.0]).save(drafter_dir / SPS_FILE_NAME, "whatever")
    assert find_sps_curve(tiny_target_dir, drafter_dir).sps == [20.0, 10.0]  # drafter dir beats the cache
    flag = tmp_path / "flag.json"
    SPSCurve.from_measurements([1, 8], [9.0, 3.0]).save(flag, "a")
    assert find_sps_curve(tiny_target_dir, drafter_dir, path=flag).sps == [9.0, 3.0]
    SPSCurve.from_measurements([1], [1.0]).save(flag, "b")
    with pytest.raises(DSparkError, match="flag.json: key"):
        find_sps_curve(tiny_target_dir, drafter_dir, path=flag)
