"""Many anchor blocks per sequence, trained in ONE drafter forward.

For an anchor at position p the block is [x_p, MASK, ..., MASK] at positions p..p+n-1. Draft j
(j = 0, 1, ...) is always x_{p+j+1}; which slot drafts it depends on the layout: anchor-first
(`sample_from_anchor`, DeepSpec) slot j, so n drafts; DFlash (vLLM's native `dflash`: bonus token
+ masks) slot j+1, the mask at the drafted token's own position, so n-1 drafts and the anchor
slot is never supervised. Each block sees the tapped context strictly before p (exactly what the
runner has cached when it drafts from that anchor) plus its own block, non-causally; blocks never
see each other. That block-sparse mask lets A blocks share one pass over the context K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_plugin.config.geometry import drafts_per_block
from dspark_plugin.train.data import Sequence


@dataclass
class BlockBatch:
    taps: torch.Tensor        # [B, T, m*d] tapped target states (context features)
    ctx_pos: torch.Tensor     # [B, T]
    q_tokens: torch.Tensor    # [B, A*n] anchor then mask tokens, per block
    q_pos: torch.Tensor       # [B, A*n]
    mask: torch.Tensor        # [B, 1, A*n, T + A*n] bool, True = attend
    labels: torch.Tensor      # [B, A, g] x_{p+k}, k = 1..g (g drafts per block: n or n-1)
    prev: torch.Tensor        # [B, A, g] x_{p+k-1}: teacher-forced input of the sequential head
    valid: torch.Tensor       # [B, A, g] bool: contiguous valid prefix of each block
    final: torch.Tensor       # [B, A, g, d] target final hidden at p+k-1 (gives p_t of x_{p+k})
    final_logz: torch.Tensor | None = None   # [B, A, g] log-partition of the target logits there

    @property
    def num_anchors(self) -> int:
        return self.labels.shape[1]

    @property
    def block_size(self) -> int:
        return self.q_tokens.shape[1] // self.num_anchors

    @property
    def num_drafts(self) -> int:
        """g; the drafting slots are the block's last g (all of them when anchor-first)."""
        return self.labels.shape[2]


def sample_anchors(seq: Sequence, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `count` distinct anchors among response positions [prompt_len, T-2]; padded slots
    reuse the first anchor and are marked unused (zero loss weight)."""
    first, last = seq.prompt_len, len(seq.ids) - 2
    span = last - first + 1
    pick = torch.randperm(span, generator=generator)[:count] + first
    used = torch.ones(count, dtype=torch.bool)
    if len(pick) < count:
        used[len(pick):] = False
        pick = torch.cat([pick, pick[:1].expand(count - len(pick))])
    return pick, used


def build_batch(
    seqs: list[Sequence],
    feats: list[tuple[torch.Tensor, ...]],
    anchors_per_seq: int,
    block_size: int,
    mask_token_id: int,
    generator: torch.Generator,
    sample_from_anchor: bool = True,
) -> BlockBatch:
    b, a, n = len(seqs), anchors_per_seq, block_size
    g = drafts_per_block(n, sample_from_anchor)
    width = max(len(s.ids) for s in seqs)
    md, d = feats[0][0].shape[-1], feats[0][1].shape[-1]
    ids = torch.zeros(b, width + n, dtype=torch.long)   # +n so block labels never index past the end
    lengths = torch.tensor([len(s.ids) for s in seqs])
    taps = torch.zeros(b, width, md)
    final = torch.zeros(b, width + n, d)
    # (taps, final) or (taps, final, logz); logz lets a pruned-vocabulary trainer skip the full head.
    with_logz = all(len(f) > 2 and f[2] is not None for f in feats)
    logz = torch.zeros(b, width + n) if with_logz else None
    anchors = torch.empty(b, a, dtype=torch.long)
    used = torch.empty(b, a, dtype=torch.bool)
    for r, (s, feat) in enumerate(zip(seqs, feats)):
        ids[r, : len(s.ids)] = torch.tensor(s.ids)
        taps[r, : len(s.ids)] = feat[0].float()
        final[r, : len(s.ids)] = feat[1].float()
        if logz is not None:
            logz[r, : len(s.ids)] = feat[2].float()
        anchors[r], used[r] = sample_anchors(s, a, generator)

    pos = anchors[:, :, None] + torch.arange(g)                     # [B, A, g] p + j: draft j is x_{p+j+1}
    labels = torch.gather(ids, 1, (pos + 1).view(b, -1)).view(b, a, g)
    prev = torch.gather(ids, 1, pos.view(b, -1)).view(b, a, g)
    valid = (pos + 1 < lengths[:, None, None]) & used[:, :, None]
    fin = torch.gather(final, 1, pos.view(b, -1, 1).expand(-1, -1, d)).view(b, a, g, d)
    fin_logz = None if logz is None else torch.gather(logz, 1, pos.view(b, -1)).view(b, a, g)

    q_tokens = torch.full((b, a, n), mask_token_id, dtype=torch.long)
    q_tokens[:, :, 0] = prev[:, :, 0]  # the anchor token x_p
    slot_pos = anchors[:, :, None] + torch.arange(n)                # [B, A, n] p..p+n-1
    ctx_pos = torch.arange(width).expand(b, width)
    ctx_mask = ctx_pos[:, None, :] < anchors.repeat_interleave(n, dim=1)[:, :, None]   # [B, A*n, T]
    block_id = torch.arange(a).repeat_interleave(n)
    blk_mask = (block_id[:, None] == block_id[None, :]).expand(b, -1, -1)          # [B, A*n, A*n]
    mask = torch.cat([ctx_mask, blk_mask], dim=-1)[:, None]
    return BlockBatch(taps=taps, ctx_pos=ctx_pos, q_tokens=q_tokens.view(b, a * n), q_pos=slot_pos.view(b, a * n),
                      mask=mask, labels=labels, prev=prev, valid=valid, final=fin,
                      final_logz=fin_logz)
