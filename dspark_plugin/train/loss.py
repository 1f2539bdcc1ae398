"""DSpark training loss (docs/algorithm.md §2), computed only on the valid prefix of each block.

`0.1 * CE(x*_k) + 0.9 * ||p_d - p_t||_1 + 1.0 * BCE(c_k, 1 - 0.5 * ||p_d - p_t||_1)`, each term a
weighted mean with w_k = exp(-(k-1)/4). The sequential head is teacher-forced: step k reads the
ground-truth x_{k-1}. Without a Markov/confidence head (DFlash-style baseline) the loss is CE only.

Inside a pruned draft vocabulary S (`drafter.draft_to_target`, decode/draft_vocab.py) the drafter's
distribution is zero outside S, so the L1 distance to the target's full distribution is exactly
`sum_{i in S} |p_d(i) - p_t(i)| + p_t(outside S)`. p_t on S needs only the S rows of the LM head
and the cached log-partition (train/cache.py), never the full-vocabulary head. CE is taken over
the labels inside S (a label outside S can never be drafted; its miss is already in the L1 term).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dspark_plugin.model.drafter import DSparkDrafter
from dspark_plugin.train.blocks import BlockBatch

CE_WEIGHT, L1_WEIGHT, BCE_WEIGHT = 0.1, 0.9, 1.0


def position_weights(n: int, decay: float = 4.0) -> torch.Tensor:
    """w_k = exp(-(k-1)/decay), k = 1..n: early positions matter most (later ones rarely survive)."""
    return torch.exp(-torch.arange(n, dtype=torch.float32) / decay)


@dataclass
class LossOutput:
    loss: torch.Tensor
    ce: float
    l1: float
    bce: float
    correct: torch.Tensor   # [n] teacher-forced top-1 hits per position
    count: torch.Tensor     # [n] supervised tokens per position


@dataclass
class DraftLogits:
    logits: torch.Tensor              # [N, V or Vd] U_k + B_k at the valid drafting slots
    hidden: torch.Tensor              # [N, d] h_k there
    w1_prev: torch.Tensor | None      # [N, r] W1[x_{k-1}] there (None without a sequential head)
    k_index: torch.Tensor             # [N] position k - 1 of each row in its block


def draft_logits(drafter: DSparkDrafter, batch: BlockBatch) -> DraftLogits:
    """Teacher-forced logits of every valid drafting slot of the batch, in one backbone pass."""
    b, a, n = batch.labels.shape          # n drafts per block
    bb = drafter.backbone
    ctx_kv = bb.context_kv(batch.taps, batch.ctx_pos)
    blk = batch.block_size
    h = bb(drafter.embed_tokens(batch.q_tokens), batch.q_pos, ctx_kv, batch.mask).view(b, a, blk, -1)
    h = h[:, :, blk - n:]                 # the drafting slots (DFlash layout: the masks only)

    valid = batch.valid
    h_v = h[valid]                                                    # [N, d]
    logits = drafter.lm_head(h_v).float()                             # U_k
    head = drafter.markov_head
    w1_prev_v = None
    if head is not None:
        # Left to right over the n block slots only, vectorised over every anchor of the batch.
        w1_prev = head.markov_w1(batch.prev)                          # [B, A, n, r]
        hs = h.to(w1_prev.dtype)
        flat_h, flat_w1 = hs.reshape(b * a, n, -1), w1_prev.reshape(b * a, n, -1)
        state = head.init_state(flat_h[:, 0])
        zs = []
        for k in range(n):
            z, state = head.latent(flat_w1[:, k], flat_h[:, k], state)
            zs.append(z)
        z = torch.stack(zs, 1).view(b, a, n, -1)
        logits = logits + head.markov_w2(z[valid]).float()           # U_k + B_k
        w1_prev_v = w1_prev[valid]
    return DraftLogits(logits, h_v, w1_prev_v, torch.arange(n).expand(b, a, n)[valid])


def drafter_loss(drafter: DSparkDrafter, batch: BlockBatch, ce_only: bool | None = None) -> LossOutput:
    n = batch.labels.shape[-1]
    if ce_only is None:
        ce_only = drafter.cfg.is_dflash_style
    valid = batch.valid
    out = draft_logits(drafter, batch)
    logits, h_v, w1_prev_v = out.logits, out.hidden, out.w1_prev
    conf_head = drafter.confidence_head

    k_index = out.k_index
    w = position_weights(n)[k_index]
    wsum = w.sum().clamp_min(1e-9)
    labels = batch.labels[valid]
    ids = drafter.draft_to_target                                    # None: the full vocabulary
    if ids is None:
        draft_labels, w_ce = labels, w
    else:
        to_draft = torch.full((drafter.target_vocab_size,), -1, dtype=torch.long)
        to_draft[ids] = torch.arange(ids.numel())
        draft_labels = to_draft[labels]
        w_ce = w * (draft_labels >= 0)
        draft_labels = draft_labels.clamp_min(0)
    logp = F.log_softmax(logits, dim=-1)
    ce = -logp.gather(1, draft_labels[:, None]).squeeze(1)
    w_ce_sum = w_ce.sum().clamp_min(1e-9)
    loss = (w_ce * ce).sum() / w_ce_sum
    l1_mean = bce_mean = torch.zeros(())
    if not ce_only:
        with torch.no_grad():
            teacher = drafter.lm_head(batch.final[valid].to(h_v.dtype)).float()
            if ids is None:
                p_t, outside = F.softmax(teacher, dim=-1), 0.0
            else:
                if batch.final_logz is None:
                    raise ValueError("a pruned-vocabulary drafter trains on features with logz "
                                     "(train/cache.py log_partition)")
                p_t = torch.exp(teacher - batch.final_logz[valid][:, None])
                outside = (1.0 - p_t.sum(-1)).clamp_min(0.0)
        l1 = (logp.exp() - p_t).abs().sum(-1) + outside
        l1_mean = (w * l1).sum() / wsum
        loss = CE_WEIGHT * loss + L1_WEIGHT * l1_mean
        if conf_head is not None:
            target_conf = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
            conf_logit = conf_head.logit(h_v, w1_prev_v).float()
            bce = F.binary_cross_entropy_with_logits(conf_logit, target_conf, reduction="none")
            bce_mean = (w * bce).sum() / wsum
            loss = loss + BCE_WEIGHT * bce_mean
    with torch.no_grad():
        drafted = logits.argmax(-1) if ids is None else ids[logits.argmax(-1)]
        hit = (drafted == labels).float()
        correct = torch.zeros(n).index_add_(0, k_index, hit)
        count = torch.zeros(n).index_add_(0, k_index, torch.ones_like(hit))
    return LossOutput(loss=loss, ce=float((w_ce * ce).detach().sum() / w_ce_sum), l1=float(l1_mean.detach()),
                      bce=float(bce_mean.detach()),
                      correct=correct, count=count)
