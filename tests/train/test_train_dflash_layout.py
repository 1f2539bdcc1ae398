"""`dspark train --layout dflash`: vLLM's native dflash drafter (bonus token + masks), trained on a
tiny real target with the block geometry native dflash drafts with, written in vLLM's layout, and
read back by this package's own loader (reference runner: greedy output unchanged)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from dspark_plugin.checkpoint.deepspec import drafter_state_dict, load_drafter, read_tensors
from dspark_plugin.cli import main
from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.errors import DSparkConfigError
from dspark_plugin.model.drafter import ContextCache, DSparkDrafter
from dspark_plugin.reference.runner import ReferenceRunner
from dspark_plugin.train.blocks import build_batch
from dspark_plugin.train.cache import target_features
from dspark_plugin.train.data import read_sequences
from dspark_plugin.train.gen_data import generate_dataset
from dspark_plugin.train.loop import TrainOptions, drafter_config, init_drafter
from tiny_target import WORDS, build_tiny_target

EOS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("train_dflash")
    target = build_tiny_target(root / "target")
    rng = random.Random(0)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": " ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(3, 8)))}) + "\n"
        for _ in range(32)))
    data = root / "data.jsonl"
    generate_dataset(target, [prompts], data, max_new_tokens=40, batch_size=16, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    return dict(root=root, target=target, data=data, model=model)


def _train(s, out, *extra) -> list[dict]:
    argv = ["train", "--target", str(s["target"]), "--data", str(s["data"]), "--out", str(out),
            "--cache", str(s["root"] / "cache"), "--threads", "1", "--no-progress",
            "--batch-size", "4", "--anchors-per-seq", "8", *extra]
    assert main(argv) == 0
    return [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]


def test_dflash_blocks_in_one_pass_equal_runner_blocks(setup):
    """Training sees exactly the drafting slots native dflash samples: the masks at p+1..p+n-1,
    each labelled with the token at its own position (the anchor slot is never supervised)."""
    s = setup
    model = s["model"]
    opts = TrainOptions(target=str(s["target"]), data=str(s["data"]), out="-", head="none", layout="dflash")
    cfg = drafter_config(model.config, opts, mask_token_id=0)
    assert not cfg.sample_from_anchor and cfg.is_dflash_style
    drafter = init_drafter(cfg, seed=3).eval()
    drafter.attach_target(model.get_input_embeddings(), model.get_output_embeddings())
    n = cfg.block_size
    assert drafter.num_drafts == n - 1
    seqs = read_sequences(s["data"])[:2]
    feats = target_features(model, seqs, cfg.target_layer_ids)
    batch = build_batch(seqs, feats, anchors_per_seq=5, block_size=n, mask_token_id=0,
                        generator=torch.Generator().manual_seed(0), sample_from_anchor=False)
    assert batch.labels.shape == (2, 5, n - 1) and batch.block_size == n
    with torch.no_grad():
        kv = drafter.backbone.context_kv(batch.taps, batch.ctx_pos)
        h = drafter.backbone(drafter.embed_tokens(batch.q_tokens), batch.q_pos, kv, batch.mask).view(2, 5, n, -1)
        for r, seq in enumerate(seqs):
            for a in range(5):
                p = int(batch.q_pos[r, a * n])
                assert batch.q_tokens[r, a * n] == seq.ids[p]          # the bonus token at p
                assert batch.q_pos[r, a * n: (a + 1) * n].tolist() == list(range(p, p + n))
                cache = ContextCache(1)
                cache.append(drafter.context_kv(feats[r][0][None, :p], torch.arange(p)[None]), torch.tensor([p]))
                ref = drafter.block_hidden(cache, torch.tensor([seq.ids[p]]), torch.tensor([p]))
                torch.testing.assert_close(h[r, a, 1:], ref[0], rtol=1e-4, atol=1e-5)
                n_valid = int(batch.valid[r, a].sum())
                assert n_valid == min(n - 1, len(seq.ids) - 1 - p)
                # mask slot j (position p+j) is labelled x_{p+j}
                assert batch.labels[r, a, :n_valid].tolist() == seq.ids[p + 1: p + 1 + n_valid]


def test_layout_dflash_trains_and_writes_vllm_native_dir(setup):
    s = setup
    out = s["root"] / "native"
    log = _train(s, out, "--head", "none", "--layout", "dflash", "--steps", "60", "--lr", "3e-3")
    assert sum(r["loss"] for r in log[-10:]) < 0.8 * sum(r["loss"] for r in log[:10])
    assert all(r["l1"] == 0 and r["bce"] == 0 for r in log)       # CE only
    assert len(log[0]["acc"]) == 6                                 # block 7 = bonus + 6 drafting masks

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"] == {"mask_token_id": cfg["dflash_config"]["mask_token_id"],
                                    "target_layer_ids": [1, 2, 3]}
    assert cfg["block_size"] == 7 and cfg["num_hidden_layers"] == 1
    assert not {"markov_rank", "enable_confidence_head", "sample_from_anchor", "target_layer_ids"} & set(cfg)
    tensors = read_tensors(out)
    # Exactly the backbone (vLLM's names, it adds `model.`); embedding and LM head are the target's.
    assert set(tensors) == set(drafter_state_dict(DSparkDrafter(DSparkConfig.from_dir(out))))
    assert "fc.weight" in tensors and "layers.0.self_attn.q_proj.weight" in tensors
    assert not any("embed_tokens" in n or "lm_head" in n for n in tensors)
    assert tensors["fc.weight"][0].dtype == torch.bfloat16

    # This package reads the native layout back (DFlash geometry) and stays lossless with it.
    model = s["model"]
    drafter = load_drafter(out, target=model, dtype=torch.float32)
    assert not drafter.cfg.sample_from_anchor and drafter.num_drafts == 6
    rows = [json.loads(l) for l in s["data"].read_text().splitlines()][:4]
    accepted: list[int] = []
    for r in rows:
        spec = ReferenceRunner(model, drafter).generate(r["prompt_ids"], max_new_tokens=40, eos_token_ids={EOS})
        plain = ReferenceRunner(model, None).generate(r["prompt_ids"], max_new_tokens=40, eos_token_ids={EOS})
        assert spec.tokens == plain.tokens
        accepted += spec.accepted
    assert accepted and max(accepted) <= 6 and sum(accepted) > 0

    # Resume works on the native layout too (the trainer state is layout-independent).
    more = _train(s, out, "--head", "none", "--layout", "dflash", "--steps", "64", "--lr", "3e-3", "--resume")
    assert [r["step"] for r in more][-4:] == [60, 61, 62, 63]


def test_layout_dflash_refuses_other_heads(setup, tmp_path, capsys):
    s = setup
    argv = ["train", "--target", str(s["target"]), "--data", str(s["data"]), "--out", str(tmp_path / "o"),
            "--threads", "1", "--no-progress", "--layout", "dflash", "--head", "vanilla"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--layout dflash" in err and "--head none" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_native_config_errors_name_file_and_key(tmp_path):
    good = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "vocab_size": 64, "block_size": 4,
            "dflash_config": {"mask_token_id": 0, "target_layer_ids": [1, 2]}}
    cfg = DSparkConfig.from_dict(good)
    assert cfg.block_size == 4 and not cfg.sample_from_anchor and cfg.is_dflash_style
    assert "dflash_config" not in cfg.extra
    cases = [
        ({"dflash_config": {"target_layer_ids": [1]}}, "dflash_config.mask_token_id"),
        ({"dflash_config": {"mask_token_id": 0, "target_layer_ids": [1], "use_swa": True}}, "dflash_config.use_swa"),
        ({"dflash_config": "x"}, "dflash_config"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ]
    for change, key in cases:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(DSparkConfigError) as e:
            DSparkConfig.from_dir(tmp_path)
        assert str(path) in str(e.value) and f"key '{key}'" in str(e.value)
