"""Training inside a pruned draft vocabulary (train/loss.py): the fast path (the draft rows of the LM
head + the cached log-partition) gives the loss and gradients of the plain full-vocabulary formula."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dspark_plugin.checkpoint.deepspec import load_drafter
from dspark_plugin.decode.draft_vocab import to_target_vocab
from dspark_plugin.train.blocks import build_batch
from dspark_plugin.train.cache import log_partition, target_features
from dspark_plugin.train.data import Sequence
from dspark_plugin.train.prune_vocab import draft_lm_head
from dspark_plugin.train.loss import BCE_WEIGHT, CE_WEIGHT, L1_WEIGHT, draft_logits, drafter_loss, position_weights
from dspark_plugin.model.drafter import DSparkDrafter
from tiny import tiny_drafter_config, tiny_target


def _pruned_setup(head: str, seed: int = 0):
    torch.manual_seed(seed)
    target = tiny_target(seed=seed)
    vocab = target.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for line in range(3):
        ids = torch.randint(3, vocab - 1, (40,), generator=gen).tolist()
        seqs.append(Sequence(ids=ids, prompt_len=6, line=line))
    # Half the vocabulary: many labels fall outside it, as the rare tokens of real data do.
    keep = torch.randperm(vocab - 1, generator=gen)[: vocab // 2].sort().values
    cfg = tiny_drafter_config(target, head)
    cfg.draft_vocab_size = int(keep.numel())
    torch.manual_seed(seed + 1)
    drafter = DSparkDrafter(cfg)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0.0, 0.2)
    full_head = target.get_output_embeddings()
    drafter.attach_target(target.get_input_embeddings(), draft_lm_head(full_head.weight, keep))
    drafter.draft_to_target = keep
    feats = target_features(target, seqs, cfg.target_layer_ids)
    feats = [(t, f, log_partition(full_head, f)) for t, f in feats]
    batch = build_batch(seqs, feats, anchors_per_seq=6, block_size=cfg.block_size, mask_token_id=cfg.mask_token_id,
                        generator=torch.Generator().manual_seed(1))
    return drafter, batch, full_head, keep


def _reference_loss(drafter, batch, full_head, keep) -> torch.Tensor:
    """Everything in the full vocabulary: p_d scattered (zero outside the subset), p_t = softmax of
    the full head, CE over the labels the drafter can draft."""
    out = draft_logits(drafter, batch)
    vocab = full_head.weight.shape[0]
    p_d = to_target_vocab(F.softmax(out.logits, dim=-1), keep, vocab)
    labels = batch.labels[batch.valid]
    p_t = F.softmax(full_head(batch.final[batch.valid]).float(), dim=-1).detach()
    w = position_weights(batch.num_drafts)[out.k_index]
    inside = torch.isin(labels, keep)
    ce = -torch.log(p_d.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-30))
    ce_mean = (w * ce * inside).sum() / (w * inside).sum()
    l1 = (p_d - p_t).abs().sum(-1)
    loss = CE_WEIGHT * ce_mean + L1_WEIGHT * (w * l1).sum() / w.sum()
    if drafter.confidence_head is not None:
        conf = drafter.confidence_head.logit(out.hidden, out.w1_prev)
        bce = F.binary_cross_entropy_with_logits(conf, (1 - 0.5 * l1).detach().clamp(0, 1), reduction="none")
        loss = loss + BCE_WEIGHT * (w * bce).sum() / w.sum()
    return loss


@pytest.mark.parametrize("head", ["vanilla", "rnn"])
def test_pruned_loss_and_gradients_equal_the_full_vocabulary_formula(one_thread, head):
    drafter, batch, full_head, keep = _pruned_setup(head)
    labels = batch.labels[batch.valid]
    assert 0 < int((~torch.isin(labels, keep)).sum()) < labels.numel()  # both kinds of label present
    params = [p for p in drafter.parameters() if p.requires_grad]

    fast = drafter_loss(drafter, batch).loss
    fast_grads = torch.autograd.grad(fast, params)
    ref = _reference_loss(drafter, batch, full_head, keep)
    ref_grads = torch.autograd.grad(ref, params)

    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)


def test_pruned_loss_needs_the_log_partition(one_thread):
    drafter, batch, _, _ = _pruned_setup("vanilla")
    batch.final_logz = None
    with pytest.raises(ValueError, match="logz"):
        drafter_loss(drafter, batch)


def test_train_with_draft_vocab_writes_a_pruned_drafter(one_thread, tmp_path):
    """`dspark train --draft-vocab N` end to end on a tiny target: d2t checkpoint, vocabulary kept on resume."""
    from dspark_plugin.cli import main
    from tiny import save_tiny_target

    target_dir = tmp_path / "target"
    save_tiny_target(target_dir)
    gen = torch.Generator().manual_seed(0)
    rows = [{"prompt_ids": [3, 4, 5], "response_ids": torch.randint(6, 60, (30,), generator=gen).tolist()}
            for _ in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "drafter"
    base = ["train", "--target", str(target_dir), "--data", str(data), "--out", str(out), "--threads", "1",
            "--no-progress", "--markov-rank", "8", "--batch-size", "2", "--anchors-per-seq", "4",
            "--draft-vocab", "40", "--steps", "4", "--save-every", "2"]
    assert main(base + ["--stop-after", "2"]) == 0
    chosen = json.loads((out / "draft_vocab.json").read_text())
    data.write_text(data.read_text() + json.dumps({"prompt_ids": [3], "response_ids": [90] * 40}) + "\n")
    assert main(base + ["--resume"]) == 0   # more data of a new token: the vocabulary stays
    assert json.loads((out / "draft_vocab.json").read_text()) == chosen
    drafter = load_drafter(out)
    assert drafter.cfg.draft_vocab_size == 40
    assert drafter.draft_to_target.tolist() == chosen
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3] and all(r["l1"] > 0 for r in log)
