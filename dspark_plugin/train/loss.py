"""DSpark training loss (docs/algorithm.md §2), computed only on the valid prefix of each block.

`0.1 * CE(x*_k) + 0.9 * ||p_d - p_t||_1 + 1.0 * BCE(c_k, 1 - 0.5 * ||p_d - p_t||_1)`, each term a
weighted mean with w_k = exp(-(k-1)/4). The sequential head is teacher-forced: step k reads the
ground-truth x_{k-1}. Without a Markov/confidence head (DFlash-style baseline) the loss is CE only.
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


def drafter_loss(drafter: DSparkDrafter, batch: BlockBatch, ce_only: bool | None = None) -> LossOutput:
    cfg = drafter.cfg
    b, a, n = batch.labels.shape          # n drafts per block
    if ce_only is None:
        ce_only = cfg.is_dflash_style
    bb = drafter.backbone
    ctx_kv = bb.context_kv(batch.taps, batch.ctx_pos)
    blk = batch.block_size
    h = bb(drafter.embed_tokens(batch.q_tokens), batch.q_pos, ctx_kv, batch.mask).view(b, a, blk, -1)
    h = h[:, :, blk - n:]                 # the drafting slots (DFlash layout: the masks only)

    valid = batch.valid
    h_v = h[valid]                                                    # [N, d]
    logits = drafter.lm_head(h_v).float()                             # U_k
    head, conf_head = drafter.markov_head, drafter.confidence_head
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

    k_index = torch.arange(n).expand(b, a, n)[valid]
    w = position_weights(n)[k_index]
    wsum = w.sum().clamp_min(1e-9)
    labels = batch.labels[valid]
    logp = F.log_softmax(logits, dim=-1)
    ce = -logp.gather(1, labels[:, None]).squeeze(1)
    loss = (w * ce).sum() / wsum
    l1_mean = bce_mean = torch.zeros(())
    if not ce_only:
        with torch.no_grad():
            p_t = F.softmax(drafter.lm_head(batch.final[valid].to(h_v.dtype)).float(), dim=-1)
        l1 = (logp.exp() - p_t).abs().sum(-1)
        l1_mean = (w * l1).sum() / wsum
        loss = CE_WEIGHT * loss + L1_WEIGHT * l1_mean
        if conf_head is not None:
            target_conf = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)
            conf_logit = conf_head.logit(h_v, w1_prev_v).float()
            bce = F.binary_cross_entropy_with_logits(conf_logit, target_conf, reduction="none")
            bce_mean = (w * bce).sum() / wsum
            loss = loss + BCE_WEIGHT * bce_mean
    with torch.no_grad():
        hit = (logits.argmax(-1) == labels).float()
        correct = torch.zeros(n).index_add_(0, k_index, hit)
        count = torch.zeros(n).index_add_(0, k_index, torch.ones_like(hit))
    return LossOutput(loss=loss, ce=float((w * ce).detach().sum() / wsum), l1=float(l1_mean.detach()),
                      bce=float(bce_mean.detach()),
                      correct=correct, count=count)
