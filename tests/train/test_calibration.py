"""Sequential temperature scaling: metrics, the fit on synthetic miscalibrated survivals (where
the right temperature is known), and the real pipeline (tiny target + drafter -> decoding ->
fit -> dspark_calibration.json -> loaded by load_drafter and applied when drafting)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from dspark_plugin.train.calibration import (
    CalibrationData,
    auc,
    calibrated_survival,
    collect_calibration_data,
    cross_validate,
    default_grid,
    ece,
    fit_sequential_temperatures,
    load_calibration_data,
    mean_ece,
    position_report,
    save_calibration_data,
    split_by_request,
)
from dspark_plugin.errors import DSparkError


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ece_by_hand():
    pred = torch.tensor([0.1, 0.1, 0.9, 0.9])
    label = torch.tensor([0.0, 1.0, 1.0, 1.0])
    # bin of 0.1: mean label 0.5 -> |0.1-0.5| * 2/4; bin of 0.9: |0.9-1| * 2/4
    assert float(ece(pred, label, 10)) == pytest.approx(0.4 * 0.5 + 0.1 * 0.5)
    assert float(ece(label, label, 10)) == 0.0
    # Vectorised over a leading grid dimension.
    both = ece(torch.stack([pred, label]), label, 10)
    assert both.tolist() == pytest.approx([0.25, 0.0])


def test_auc_matches_pairwise_count():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 6, (60,), generator=g).double()  # many ties
    label = torch.rand(60, generator=g) < 0.4
    pos, neg = score[label], score[~label]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auc(score, label) == pytest.approx(float(pairs.mean()))
    assert auc(score, torch.ones(60, dtype=torch.bool)) != auc(score, torch.ones(60, dtype=torch.bool))  # NaN


def synthetic(n: int, scales: list[float], seed: int) -> CalibrationData:
    """True acceptance p_k = sigmoid(z_k), independent per position; the head reports scale_k * z_k.
    The exact calibration is T_k = scale_k."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(scales), generator=g, dtype=torch.float64) * 1.5 + 0.8
    accept = torch.sigmoid(z)
    return CalibrationData(z * torch.tensor(scales, dtype=torch.float64), accept, torch.arange(n))


def test_fit_recovers_known_temperatures_and_lowers_held_out_ece():
    scales = [3.0, 0.5, 2.0, 1.0]
    fit = synthetic(6000, scales, seed=1)
    held = synthetic(6000, scales, seed=2)
    temps = fit_sequential_temperatures(fit.conf_logits, fit.survival_labels)
    for t, s in zip(temps, scales):
        assert t == pytest.approx(s, rel=0.2), (temps, scales)
    report = position_report(held, temps)
    for r in report[:3]:
        assert r["ece_after"] < 0.5 * r["ece_before"], r
    for r in report:
        assert r["ece_after"] < 0.02 + r["ece_before"] * 0.5 or r["ece_after"] < 0.01
        # A per-position temperature keeps the first position's ranking exactly.
    assert report[0]["auc_after"] == pytest.approx(report[0]["auc_before"])


def test_log_loss_objective_recovers_known_temperatures_too():
    scales = [3.0, 0.5, 2.0]
    data = synthetic(6000, scales, seed=1)
    temps = fit_sequential_temperatures(data.conf_logits, data.survival_labels, objective="nll")
    for t, s in zip(temps, scales):
        assert t == pytest.approx(s, rel=0.1), (temps, scales)
    with pytest.raises(DSparkError, match="unknown objective 'brier'"):
        fit_sequential_temperatures(data.conf_logits, data.survival_labels, objective="brier")


def test_cross_validation_sees_a_real_miscalibration_and_not_a_calibrated_head():
    mis = synthetic(4000, [2.0, 2.0, 2.0], seed=7)
    cv = cross_validate(mis, 0.5, splits=4)
    assert cv["splits_improved"] == 4 and cv["ece_after_mean"] < 0.5 * cv["ece_before_mean"]
    assert cv["ece_before"][0] == pytest.approx(mean_ece(split_by_request(mis, 0.5, 0)[1], None))
    calibrated = synthetic(4000, [1.0, 1.0, 1.0], seed=8)
    cv = cross_validate(calibrated, 0.5, splits=4, objective="nll")
    assert abs(cv["ece_after_mean"] - cv["ece_before_mean"]) < 0.01  # nothing to fix: fitting noise only
    with pytest.raises(DSparkError, match="splits >= 1"):
        cross_validate(mis, 0.5, splits=0)


def test_calibration_data_round_trip_and_bad_files(tmp_path):
    data = synthetic(50, [1.0, 2.0], seed=9)
    path = save_calibration_data(data, tmp_path / "blocks.safetensors", {"temperature": "0.0"})
    back, meta = load_calibration_data(path)
    assert meta["temperature"] == "0.0"
    assert torch.equal(back.conf_logits, data.conf_logits) and torch.equal(back.request, data.request)
    from safetensors.torch import save_file

    save_file({"conf_logits": torch.zeros(3, 2), "accept_prob": torch.zeros(3, 2)}, str(tmp_path / "no_req.safetensors"))
    with pytest.raises(DSparkError, match=r"no_req.safetensors: key 'request': missing"):
        load_calibration_data(tmp_path / "no_req.safetensors")
    save_file({"conf_logits": torch.zeros(3, 2), "accept_prob": torch.zeros(3, 3), "request": torch.zeros(3)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(DSparkError, match=r"bad.safetensors: key 'accept_prob': shape \(3, 3\)"):
        load_calibration_data(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DSparkError, match="junk.safetensors: not a safetensors calibration data file"):
        load_calibration_data(tmp_path / "junk.safetensors")
    with pytest.raises(DSparkError, match="calibration data file not found"):
        load_calibration_data(tmp_path / "missing.safetensors")


def test_fit_on_binary_outcomes_also_works():
    scales = [2.5, 2.5, 2.5]
    data = synthetic(8000, scales, seed=3)
    binary = data.binary_survival(seed=4).double()
    temps = fit_sequential_temperatures(data.conf_logits, binary)
    assert all(1.8 < t < 3.5 for t in temps), temps


def test_calibrated_head_keeps_temperature_one():
    data = synthetic(4000, [1.0, 1.0], seed=5)
    temps = fit_sequential_temperatures(data.conf_logits, data.survival_labels, grid=torch.tensor([0.5, 1.0, 2.0]))
    assert temps == [1.0, 1.0]
    # On an exact tie (constant labels the head cannot distinguish), T = 1 wins.
    # Logits of 0 give 0.5 at every temperature: all T tie, and T = 1 wins.
    flat = fit_sequential_temperatures(torch.zeros(10, 2), torch.tensor([[0.3, 0.1]]).expand(10, 2))
    assert flat == [1.0, 1.0]


def test_grid_and_survival_helpers():
    grid = default_grid()
    assert float(grid.min()) == pytest.approx(0.05) and float(grid.max()) == pytest.approx(20.0)
    assert 1.0 in grid.tolist()
    z = torch.tensor([[0.0, 2.0]])
    assert calibrated_survival(z, [1.0, 2.0]).tolist()[0] == pytest.approx([0.5, 0.5 * float(torch.sigmoid(torch.tensor(1.0)))])


def test_bad_shapes():
    with pytest.raises(DSparkError, match=r"\[N, gamma\]"):
        fit_sequential_temperatures(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(DSparkError, match="no drafted blocks"):
        fit_sequential_temperatures(torch.zeros(0, 3), torch.zeros(0, 3))


def test_split_by_request_keeps_requests_whole():
    data = CalibrationData(torch.zeros(10, 2), torch.zeros(10, 2), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4]))
    fit, held = split_by_request(data, 0.4)
    assert set(fit.request.tolist()).isdisjoint(held.request.tolist())
    assert len(fit.request) + len(held.request) == 10
    same_fit, same_held = split_by_request(data, 0.0)
    assert same_fit is same_held is data


# --- the real pipeline ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny target with tokenizer, its own regenerated data, and a drafter trained briefly."""
    from transformers import AutoModelForCausalLM

    from dspark_plugin.cli import main
    from dspark_plugin.train.gen_data import generate_dataset
    from tiny_target import WORDS, build_tiny_target

    root = tmp_path_factory.mktemp("calib")
    target_dir = build_tiny_target(root / "target")
    rng = random.Random(0)
    lines = [json.dumps({"prompt": " ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(3, 8)))}) for _ in range(72)]
    (root / "train_prompts.jsonl").write_text("\n".join(lines[:48]) + "\n")
    (root / "heldout_prompts.jsonl").write_text("\n".join(lines[48:]) + "\n")
    data = root / "data.jsonl"
    generate_dataset(target_dir, [root / "train_prompts.jsonl"], data, max_new_tokens=40, batch_size=16,
                     progress=False)
    drafter_dir = root / "drafter"
    assert main(["train", "--target", str(target_dir), "--data", str(data), "--out", str(drafter_dir),
                 "--cache", str(root / "cache"), "--threads", "1", "--no-progress", "--markov-rank", "16",
                 "--batch-size", "4", "--anchors-per-seq", "8", "--steps", "150", "--lr", "3e-3"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    return dict(root=root, target_dir=target_dir, drafter_dir=drafter_dir, model=model)


def test_calibration_lowers_held_out_ece_of_a_trained_drafter(trained):
    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.reference.prompts import encode_prompt, read_prompts
    from transformers import AutoTokenizer

    model = trained["model"]
    drafter = load_drafter(trained["drafter_dir"], target=model)
    tok = AutoTokenizer.from_pretrained(str(trained["target_dir"]))
    prompts = [encode_prompt(tok, t) for t in read_prompts(trained["root"] / "heldout_prompts.jsonl")]
    data = collect_calibration_data(model, drafter, prompts, max_new_tokens=32, temperature=1.0, eos_token_ids={2})
    assert data.conf_logits.shape[1] == drafter.num_drafts and len(data.conf_logits) > 100
    assert float(data.accept_prob[:, 0].mean()) > 0.2  # the drafter learned something: a real signal
    fit, held = split_by_request(data, 0.5, seed=1)
    temps = fit_sequential_temperatures(fit.conf_logits, fit.survival_labels)
    before = calibrated_survival(held.conf_logits, None)
    after = calibrated_survival(held.conf_logits, temps)
    labels = held.survival_labels
    ece_before = ece(before.t(), labels.t())
    ece_after = ece(after.t(), labels.t())
    # Seen here: mean ECE 0.11 -> 0.02; the margin allows for a different tiny training run.
    assert float(ece_after.mean()) < 0.7 * float(ece_before.mean()), (ece_before, ece_after, temps)
    assert any(abs(t - 1.0) > 0.05 for t in temps)


def test_cli_writes_temperatures_that_the_drafter_loads(trained, capsys):
    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.cli import main
    from dspark_plugin.decode.draft import sequential_draft

    drafter_dir = trained["drafter_dir"]
    calib = drafter_dir / "dspark_calibration.json"
    calib.unlink(missing_ok=True)
    model = trained["model"]
    raw = load_drafter(drafter_dir, target=model)
    assert raw.confidence_temperatures is None

    argv = ["calibrate", "--target", str(trained["target_dir"]), "--drafter", str(drafter_dir),
            "--data", str(trained["root"] / "heldout_prompts.jsonl"), "--limit", "16", "--max-new-tokens", "24"]
    # Without --force the file is written only when the held-out ECE improves.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("wrote" in out) == calib.exists() and ("wrote" in out or "not written: mean held-out ECE" in out)
    calib.unlink(missing_ok=True)
    argv.append("--force")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ECE before" in out and "wrote" in out
    saved = json.loads(calib.read_text())
    temps = saved["temperatures"]
    assert len(temps) == raw.num_drafts and all(t > 0 for t in temps)
    assert saved["method"] == "sequential_temperature_scaling" and len(saved["positions"]) == raw.num_drafts
    assert {"ece_before", "ece_after", "auc_before", "auc_after"} <= set(saved["positions"][0])

    # Loaded automatically, and applied when drafting: c'_k = sigmoid(logit(c_k) / T_k).
    cal = load_drafter(drafter_dir, target=model)
    assert cal.confidence_temperatures.tolist() == pytest.approx(temps)
    h = torch.randn(2, raw.num_drafts, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    anchor = torch.tensor([5, 9])
    c_raw = sequential_draft(raw, h, anchor).confidence.double()
    c_cal = sequential_draft(cal, h, anchor).confidence.double()
    expect = torch.sigmoid((torch.log(c_raw) - torch.log1p(-c_raw)) / torch.tensor(temps, dtype=torch.float64))
    assert torch.allclose(c_cal, expect, atol=1e-4)

    # Decoded blocks saved once, then refitted with cross-validation without decoding again.
    calib.unlink()
    blocks = trained["root"] / "blocks.safetensors"
    assert main(argv + ["--dry-run", "--save-data", str(blocks)]) == 0 and blocks.is_file()
    capsys.readouterr()
    assert main(["calibrate", "--target", str(trained["target_dir"]), "--drafter", str(drafter_dir),
                 "--load-data", str(blocks), "--splits", "3", "--objective", "nll", "--force"]) == 0
    out = capsys.readouterr().out
    assert "cross-validation over 3 prompt splits" in out and "temperatures fitted on all prompts" in out
    saved = json.loads(calib.read_text())
    assert saved["objective"] == "nll" and saved["cross_validation"]["splits"] == 3
    assert saved["fitted_on"] == "all prompts" and saved["sampling_temperature"] == 1.0

    # Dry run writes nothing; a drafter without a confidence head is a clear error.
    calib.unlink()
    assert main(argv + ["--dry-run"]) == 0 and not calib.exists()
    assert main(argv[:1] + ["--target", str(trained["target_dir"]), "--drafter", str(drafter_dir), "--data",
                            str(trained["root"] / "missing.jsonl")]) == 2
