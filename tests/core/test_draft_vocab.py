"""Pruned draft vocabulary (`draft_vocab_size` + `d2t`): lossless, equal to restricting the full
drafter's logits to the subset, and bad checkpoints are refused naming the file and key."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_plugin.checkpoint.deepspec import load_drafter, save_drafter
from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.decode.draft import sequential_draft
from dspark_plugin.errors import DSparkCheckpointError, DSparkConfigError
from dspark_plugin.reference.runner import ReferenceRunner
from dspark_plugin.train.prune_vocab import prune_drafter, select_draft_vocab
from test_lossless_sampling import chi2_pvalue, exact_joint  # tests/core/, beside this file
from tiny import tiny_drafter, tiny_target

PROMPTS = [[2 + p, 3 + (p * 7) % 50, 4 + (p * 13) % 60, 10 + p % 9] for p in range(12)]


def pruned_copy(tmp_path, target, drafter, ids):
    full = save_drafter(drafter, tmp_path / "full", dtype=torch.float32)
    out = prune_drafter(full, target.get_output_embeddings().weight, torch.as_tensor(ids), tmp_path / "pruned")
    return load_drafter(out, target=target)


def test_select_draft_vocab_keeps_the_most_frequent():
    counts = Counter({5: 10, 7: 10, 3: 4, 9: 1})
    assert select_draft_vocab(counts, 3, 12, keep=[1]).tolist() == [1, 5, 7]   # tie 5/7: both fit
    assert select_draft_vocab(counts, 4, 12).tolist() == [3, 5, 7, 9]
    assert select_draft_vocab(counts, 6, 12).tolist() == [0, 1, 3, 5, 7, 9]   # filled by id
    with pytest.raises(Exception, match="--size"):
        select_draft_vocab(counts, 13, 12)


def test_pruned_checkpoint_round_trips(tmp_path):
    target = tiny_target()
    drafter = tiny_drafter(target)
    ids = list(range(0, 96, 2))
    pruned = pruned_copy(tmp_path, target, drafter, ids)
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 48
    tensors = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    assert tensors["markov_head.markov_w2.weight"].shape == (48, 16)
    assert tensors["lm_head.weight"].shape == (48, 32)
    assert (tensors["d2t"] + torch.arange(48)).tolist() == ids          # EAGLE-3 / vLLM convention
    assert pruned.draft_to_target.tolist() == ids
    assert torch.equal(pruned.lm_head.weight, target.get_output_embeddings().weight[ids])


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_pruned_drafts_are_the_full_drafters_restricted_to_the_subset(tmp_path, head):
    target = tiny_target()
    drafter = tiny_drafter(target, head)
    ids = torch.tensor(sorted(set(range(0, 96, 3)) | {5, 17}))
    pruned = pruned_copy(tmp_path, target, drafter, ids)
    torch.manual_seed(0)
    h, anchor = torch.randn(3, 7, 32), torch.tensor([4, 9, 40])
    block = sequential_draft(pruned, h, anchor)
    assert set(block.tokens.flatten().tolist()) <= set(ids.tolist())
    # First draft by hand: argmax over the subset of U_1 + B_1 from the *full* drafter's weights.
    full_head = drafter.markov_head
    bias, _, _ = full_head.step(anchor, h[:, 0], full_head.init_state(h[:, 0]))
    logits = drafter.lm_head(h[:, 0]) + bias
    assert block.tokens[:, 0].tolist() == ids[logits[:, ids].argmax(-1)].tolist()
    sampled = sequential_draft(pruned, h, anchor, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert sampled.probs.shape == (3, 7, 96)
    outside = torch.ones(96, dtype=torch.bool)
    outside[ids] = False
    assert float(sampled.probs[..., outside].abs().max()) == 0.0
    assert torch.allclose(sampled.probs.sum(-1), torch.ones(3, 7))


def test_pruned_greedy_equals_target(tmp_path):
    target = tiny_target(init=0.3)
    reference = ReferenceRunner(target)
    expected = [reference.generate(p, max_new_tokens=48).tokens for p in PROMPTS]
    # Keep the tokens the target actually says, plus every other id: drafts can both hit and miss.
    said = {t for toks in expected for t in toks}
    ids = sorted(said | set(range(0, 96, 2)))
    assert len(ids) < 96
    runner = ReferenceRunner(target, pruned_copy(tmp_path, target, tiny_drafter(target, "gated"), ids), gamma=7)
    accepted = []
    for prompt, want in zip(PROMPTS, expected):
        res = runner.generate(prompt, max_new_tokens=48)
        assert res.tokens == want, f"prompt {prompt}: pruned-vocabulary drafting changed the output"
        assert res.fallbacks == 0
        accepted += res.accepted
    assert max(accepted) >= 1


def test_pruned_sampling_matches_target(tmp_path):
    """Draft probabilities are zero outside the subset; rejection sampling must still be exact."""
    target = tiny_target(vocab=6, layers=4, init=0.1)
    with torch.no_grad():  # flatter than tiny_target's default: every token has real mass (1 and 5: 0.2-0.4)
        target.get_output_embeddings().weight.mul_(0.25)
    drafter = tiny_drafter(target, "vanilla", block_size=7, rank=4)
    runner = ReferenceRunner(target, pruned_copy(tmp_path, target, drafter, [0, 2, 3, 4]), gamma=4)
    prompt, trials = [2, 3, 4], 2500
    observed, accepted = {}, 0
    for seed in range(trials):
        res = runner.generate(prompt, max_new_tokens=3, temperature=1.0, seed=seed)
        observed[tuple(res.tokens)] = observed.get(tuple(res.tokens), 0) + 1
        accepted += sum(res.accepted)
    assert accepted > trials // 4, "drafts were rarely accepted: the test would not exercise acceptance"
    assert any(1 in k or 5 in k for k in observed), "tokens outside the draft vocabulary must still appear"
    assert chi2_pvalue(observed, exact_joint(target, prompt, 3, 1.0, 0), trials) > 0.01


def _break(tmp_path, target, edit):
    drafter = tiny_drafter(target)
    pruned_copy(tmp_path, target, drafter, list(range(0, 96, 2)))
    file = tmp_path / "pruned" / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))
    return tmp_path / "pruned"


@pytest.mark.parametrize("edit,key,message", [
    (lambda t: t.update(d2t=t["d2t"] + 200), "d2t", "outside the target vocabulary"),
    (lambda t: t.update(d2t=t["d2t"][:10]), "d2t", "shape"),
    (lambda t: t.update(d2t=5 - torch.arange(48)), "d2t", "same target token"),
    (lambda t: t.update(d2t=t["d2t"].float()), "d2t", "integer"),
    (lambda t: t.pop("d2t"), "d2t", "required"),
    (lambda t: t.pop("lm_head.weight"), "lm_head.weight", "required"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"][:40]}), "lm_head.weight", "shape"),
])
def test_bad_pruned_checkpoints_name_file_and_key(tmp_path, edit, key, message):
    target = tiny_target()
    path = _break(tmp_path, target, edit)
    with pytest.raises(DSparkCheckpointError, match=message) as err:
        load_drafter(path, target=target)
    assert key in str(err.value) and "model.safetensors" in str(err.value)


def test_bad_draft_vocab_size_is_a_config_error(tmp_path):
    target = tiny_target()
    raw = tiny_drafter(target).cfg.to_dict()
    for value, message in ((200, "exceeds vocab_size"), (0, ">= 1"), ("48", "integer")):
        with pytest.raises(DSparkConfigError, match=message) as err:
            DSparkConfig.from_dict({**raw, "draft_vocab_size": value}, source="x/config.json")
        assert "draft_vocab_size" in str(err.value)
    assert not DSparkConfig.from_dict({**raw, "draft_vocab_size": 96}).pruned_vocab
    with pytest.raises(DSparkConfigError, match="Markov head"):
        DSparkConfig.from_dict({**raw, "markov_rank": 0, "enable_confidence_head": False, "draft_vocab_size": 48})
