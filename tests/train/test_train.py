"""Trainer on a tiny real target: training raises tau, checkpoints stay lossless in the reference
runner, resume continues the same loss curve, every head trains, the many-blocks-in-one-pass
mask reproduces the runner's one-block drafting exactly."""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from dspark_plugin.checkpoint.deepspec import load_drafter, read_tensors
from dspark_plugin.cli import main
from dspark_plugin.model.drafter import ContextCache
from dspark_plugin.reference.runner import ReferenceRunner
from dspark_plugin.train.blocks import build_batch
from dspark_plugin.train.cache import target_features
from dspark_plugin.train.data import read_sequences
from dspark_plugin.train.gen_data import generate_dataset
from dspark_plugin.train.loop import TrainOptions, drafter_config, init_drafter
from tiny_target import WORDS, build_tiny_target

EOS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)  # the tiny model gains nothing from threads; CI machines are shared
    root = tmp_path_factory.mktemp("train")
    target = build_tiny_target(root / "target")
    rng = random.Random(0)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": " ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(3, 8)))}) + "\n"
        for _ in range(48)))
    data = root / "data.jsonl"
    generate_dataset(target, [prompts], data, max_new_tokens=40, batch_size=16, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    return dict(root=root, target=target, data=data, cache=root / "cache", model=model)


def _train(s, out, *extra):
    argv = ["train", "--target", str(s["target"]), "--data", str(s["data"]), "--out", str(out),
            "--cache", str(s["cache"]), "--threads", "1", "--no-progress", "--markov-rank", "16",
            "--batch-size", "4", "--anchors-per-seq", "8", *extra]
    assert main(argv) == 0
    return [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]


def _tau_and_lossless(s, drafter_dir, n_prompts=8, temperature=0.0):
    model = s["model"]
    drafter = load_drafter(drafter_dir, target=model)
    rows = [json.loads(l) for l in s["data"].read_text().splitlines()][:n_prompts]
    emitted = rounds = 0
    for r in rows:
        spec = ReferenceRunner(model, drafter).generate(r["prompt_ids"], max_new_tokens=40,
                                                         temperature=temperature, eos_token_ids={EOS})
        if temperature == 0:
            plain = ReferenceRunner(model, None).generate(r["prompt_ids"], max_new_tokens=40, eos_token_ids={EOS})
            assert spec.tokens == plain.tokens, f"{drafter_dir}: greedy output differs from target-only"
        emitted += sum(spec.accepted) + len(spec.accepted)
        rounds += len(spec.accepted)
    return emitted / rounds


def test_training_raises_tau_and_stays_lossless(setup):
    s = setup
    _train(s, s["root"] / "untrained", "--steps", "1", "--lr", "0")
    log = _train(s, s["root"] / "vanilla", "--steps", "300", "--lr", "3e-3")
    first = sum(r["loss"] for r in log[:20]) / 20
    last = sum(r["loss"] for r in log[-20:]) / 20
    assert last < 0.8 * first
    assert sum(sum(r["acc"]) for r in log[-20:]) > 2 * sum(sum(r["acc"]) for r in log[:20])
    tau0 = _tau_and_lossless(s, s["root"] / "untrained")
    tau1 = _tau_and_lossless(s, s["root"] / "vanilla")
    assert tau1 > tau0 + 0.5, (tau0, tau1)
    assert tau1 > 2.0
    # The written drafter is DeepSpec-format: no shared embedding/LM head, bf16 by default.
    tensors = read_tensors(s["root"] / "vanilla")
    assert "embed_tokens.weight" not in tensors and "lm_head.weight" not in tensors
    assert tensors["fc.weight"][0].dtype == torch.bfloat16
    cfg = json.loads((s["root"] / "vanilla" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["block_size"] == 7
    assert cfg["target_layer_ids"] == [1, 2, 3] and cfg["markov_head_type"] == "vanilla"


def test_resume_continues_same_curve(setup):
    s = setup
    full = _train(s, s["root"] / "full", "--steps", "16", "--head", "rnn")
    part = _train(s, s["root"] / "resumed", "--steps", "16", "--head", "rnn", "--stop-after", "8")
    assert len(part) == 8
    resumed = _train(s, s["root"] / "resumed", "--steps", "16", "--head", "rnn", "--resume")
    assert [r["step"] for r in resumed] == list(range(16))
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
    wa = read_tensors(s["root"] / "full")
    wb = read_tensors(s["root"] / "resumed")
    for name, (t, _) in wa.items():
        torch.testing.assert_close(t.float(), wb[name][0].float(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("head", ["none", "gated", "rnn"])
def test_every_head_trains(setup, head):
    s = setup
    out = s["root"] / f"head_{head}"
    log = _train(s, out, "--steps", "60", "--lr", "3e-3", "--head", head)
    assert sum(r["loss"] for r in log[-10:]) < 0.8 * sum(r["loss"] for r in log[:10])
    names = set(read_tensors(out))
    if head == "none":
        assert not any(n.startswith(("markov_head.", "confidence_head.")) for n in names)
        assert all(r["l1"] == 0 and r["bce"] == 0 for r in log)  # CE only
    else:
        assert {"markov_head.markov_w1.weight", "confidence_head.proj.weight"} <= names
        assert ("markov_head.gate_proj.weight" in names) == (head == "gated")
        assert ("markov_head.joint_proj.weight" in names) == (head == "rnn")
    _tau_and_lossless(s, out, n_prompts=3)


def test_many_blocks_in_one_pass_equal_runner_blocks(setup):
    """The block-sparse training mask must give each block exactly what the runner gives it."""
    s = setup
    model = s["model"]
    opts = TrainOptions(target=str(s["target"]), data=str(s["data"]), out="-", markov_rank=16)
    cfg = drafter_config(model.config, opts, mask_token_id=0)
    drafter = init_drafter(cfg, seed=3).eval()
    drafter.attach_target(model.get_input_embeddings(), model.get_output_embeddings())
    seqs = read_sequences(s["data"])[:2]
    feats = target_features(model, seqs, cfg.target_layer_ids)
    batch = build_batch(seqs, feats, anchors_per_seq=5, block_size=cfg.block_size,
                        mask_token_id=cfg.mask_token_id, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kv = drafter.backbone.context_kv(batch.taps, batch.ctx_pos)
        h = drafter.backbone(drafter.embed_tokens(batch.q_tokens), batch.q_pos, kv, batch.mask)
        h = h.view(2, 5, cfg.block_size, -1)
        for r, seq in enumerate(seqs):
            for a in range(5):
                p = int(batch.q_pos[r, a * cfg.block_size])
                assert seq.prompt_len <= p <= len(seq.ids) - 2
                cache = ContextCache(1)
                taps = feats[r][0][None, :p]
                cache.append(drafter.context_kv(taps, torch.arange(p)[None]), torch.tensor([p]))
                ref = drafter.block_hidden(cache, torch.tensor([seq.ids[p]]), torch.tensor([p]))
                torch.testing.assert_close(h[r, a], ref[0], rtol=1e-4, atol=1e-5)
                n_valid = int(batch.valid[r, a].sum())
                assert n_valid == min(cfg.block_size, len(seq.ids) - 1 - p)
                assert batch.valid[r, a, :n_valid].all()  # a contiguous prefix
                assert batch.labels[r, a, :n_valid].tolist() == seq.ids[p + 1 : p + 1 + n_valid]


def test_bad_input(setup, tmp_path):
    s = setup
    base = ["train", "--target", str(s["target"]), "--out", str(tmp_path / "o"), "--threads", "1", "--no-progress"]
    assert main(base + ["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(base + ["--data", str(s["data"]), "--markov-rank", "0"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_ids": [1, 2], "response_ids": "oops"}) + "\n" + "{}\n")
    assert main(base + ["--data", str(bad)]) == 2


def test_online_features_equal_cache(setup):
    """--no-cache (target inside the loop, fp32) trains like the fp16 activation cache."""
    s = setup
    cached = _train(s, s["root"] / "cached3", "--steps", "3")
    online = _train(s, s["root"] / "online3", "--steps", "3", "--no-cache")
    assert not (s["root"] / "online3" / "act_cache").exists()
    for a, b in zip(cached, online):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)


def test_bfloat16_cache_trains_like_the_float32_cache_and_keeps_its_setting(setup, tmp_path):
    """--cache-matmul bfloat16 (the cache build's matrix products in bf16) gives features close to the
    float32 pass and the same loss curve; a cache refuses the other setting, naming the key."""
    s = setup
    seqs = read_sequences(s["data"])[:6]
    layers = drafter_config(s["model"].config, TrainOptions(target="", data="", out=""), 0).target_layer_ids
    exact = target_features(s["model"], seqs, layers)
    fast = target_features(s["model"], seqs, layers, matmul_dtype="bfloat16")
    for (t32, f32), (t16, f16) in zip(exact, fast):
        assert t16.dtype == torch.float32 and not torch.equal(t16, t32)  # the bf16 products did run
        assert (t16 - t32).norm() / t32.norm() < 2e-2
        assert (f16 - f32).norm() / f32.norm() < 2e-2
    s_bf16 = dict(s, cache=tmp_path / "cache_bf16")
    bf16 = _train(s_bf16, tmp_path / "bf16", "--steps", "3", "--cache-matmul", "bfloat16")
    fp32 = _train(s, s["root"] / "cached3b", "--steps", "3")
    for a, b in zip(fp32, bf16):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
    assert json.loads((tmp_path / "cache_bf16" / "manifest.json").read_text())["matmul_dtype"] == "bfloat16"
    argv = ["train", "--target", str(s["target"]), "--data", str(s["data"]), "--out", str(tmp_path / "o"),
            "--cache", str(tmp_path / "cache_bf16"), "--cache-matmul", "float32", "--threads", "1", "--no-progress"]
    assert main(argv) == 2


def test_init_from_target_copies_the_last_layers(setup):
    from dspark_plugin.train.loop import init_from_target

    model = setup["model"]
    opts = TrainOptions(target=str(setup["target"]), data=str(setup["data"]), out="unused", layers=1)
    drafter = init_drafter(drafter_config(model.config, opts, mask_token_id=1), seed=0)
    before = drafter.backbone.fc.weight.clone()
    assert init_from_target(drafter, model) > 0
    last = model.model.layers[-1]
    layer = drafter.backbone.layers[0]
    assert torch.equal(layer.self_attn.q_proj.weight, last.self_attn.q_proj.weight)
    assert torch.equal(layer.mlp.down_proj.weight, last.mlp.down_proj.weight)
    assert torch.equal(drafter.backbone.norm.weight, model.model.norm.weight)
    assert torch.equal(drafter.backbone.fc.weight, before)  # the context projection starts fresh
