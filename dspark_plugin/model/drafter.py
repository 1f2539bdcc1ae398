"""The DSpark drafter: parallel backbone + sequential head + confidence head, and its context cache.

Embedding and LM head belong to the target (frozen, shared); a checkpoint may carry its own.
Shared target modules are held outside the module tree so `.to()` / `state_dict()` of the
drafter never touch the target's weights.
"""
from __future__ import annotations

import torch
from torch import nn

from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.model.backbone import KV, DSparkBackbone
from dspark_plugin.model.heads import build_confidence_head, build_markov_head


class ContextCache:
    """Per-layer context K/V of the drafter, per request, padded to a common capacity.

    Only verified positions are ever appended; the draft block's own K/V is recomputed each
    round and never stored, so nothing has to be rolled back after verification.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.kv: KV | None = None
        self.lengths = torch.zeros(batch_size, dtype=torch.long)

    def append(self, new_kv: KV, counts: torch.Tensor) -> None:
        """new_kv[layer] = (k, v) [B, H, Ln, Dh]; row r contributes its first counts[r] positions."""
        k0 = new_kv[0][0]
        b, h, ln, dh = k0.shape
        counts = counts.to(torch.long).cpu()
        need = int((self.lengths + ln).max())
        if self.kv is None or need > self.kv[0][0].shape[2]:
            cap = max(64, 2 * need)
            grown = []
            for i in range(len(new_kv)):
                bufs = [k0.new_zeros(b, h, cap, dh) for _ in range(2)]
                if self.kv is not None:
                    old = self.kv[i][0].shape[2]
                    bufs[0][:, :, :old] = self.kv[i][0]
                    bufs[1][:, :, :old] = self.kv[i][1]
                grown.append((bufs[0], bufs[1]))
            self.kv = grown
        # Rows write ln slots from their own length; slots past counts[r] stay masked and are
        # overwritten by the next append.
        idx = (self.lengths[:, None] + torch.arange(ln)[None, :]).to(k0.device)
        idx = idx[:, None, :, None].expand(b, h, ln, dh)
        for (kb, vb), (k, v) in zip(self.kv, new_kv):
            kb.scatter_(2, idx, k.to(kb.dtype))
            vb.scatter_(2, idx, v.to(vb.dtype))
        self.lengths = self.lengths + counts

    def view(self) -> tuple[KV, torch.Tensor | None]:
        """K/V trimmed to the longest row, and the context part of the attention mask (None if dense)."""
        assert self.kv is not None, "context cache is empty: prefill first"
        longest = int(self.lengths.max())
        kv = [(k[:, :, :longest], v[:, :, :longest]) for k, v in self.kv]
        if bool((self.lengths == longest).all()):
            return kv, None
        valid = torch.arange(longest)[None, :] < self.lengths[:, None]
        return kv, valid.to(kv[0][0].device)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished requests (rows not in `rows`)."""
        if self.kv is not None:
            self.kv = [(k[rows], v[rows]) for k, v in self.kv]
        self.lengths = self.lengths[rows.cpu()]
        self.batch_size = len(self.lengths)


class DSparkDrafter(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = DSparkBackbone(cfg)
        self.markov_head = build_markov_head(cfg)
        self.confidence_head = build_confidence_head(cfg)
        # Per-position confidence temperatures from calibration (None = identity).
        self.confidence_temperatures: torch.Tensor | None = None
        # Pruned draft vocabulary (cfg.draft_vocab_size < vocab_size): draft id -> target id [Vd].
        # The LM head and Markov W2 then score only those tokens; None = the full vocabulary.
        self.draft_to_target: torch.Tensor | None = None
        self.__dict__["_embed_tokens"] = None
        self.__dict__["_lm_head"] = None

    # -- target-shared parts --------------------------------------------------------------
    @property
    def embed_tokens(self) -> nn.Module:
        if self._embed_tokens is None:
            raise RuntimeError("drafter has no embedding: attach the target's with attach_target()")
        return self._embed_tokens

    @property
    def lm_head(self) -> nn.Module:
        if self._lm_head is None:
            raise RuntimeError("drafter has no LM head: attach the target's with attach_target()")
        return self._lm_head

    def attach_target(self, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        self.__dict__["_embed_tokens"] = embed_tokens
        self.__dict__["_lm_head"] = lm_head

    # -- geometry -------------------------------------------------------------------------
    @property
    def num_drafts(self) -> int:
        """gamma: anchor-first blocks predict from every slot, DFlash layout from the masks only."""
        return self.cfg.num_drafts

    @property
    def target_vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.fc.weight.dtype

    # -- forward pieces -------------------------------------------------------------------
    def context_kv(self, taps: torch.Tensor, positions: torch.Tensor) -> KV:
        return self.backbone.context_kv(taps, positions)

    def block_hidden(self, cache: ContextCache, anchor: torch.Tensor, anchor_pos: torch.Tensor) -> torch.Tensor:
        """One non-causal pass over [anchor, mask, ...] -> h [B, gamma, d] for the drafted positions."""
        b, n = anchor.shape[0], self.cfg.block_size
        tokens = torch.full((b, n), self.cfg.mask_token_id, dtype=torch.long, device=anchor.device)
        tokens[:, 0] = anchor
        positions = anchor_pos.to(anchor.device)[:, None] + torch.arange(n, device=anchor.device)[None, :]
        kv, ctx_valid = cache.view()
        mask = None
        if ctx_valid is not None:
            block = torch.ones(b, n, dtype=torch.bool, device=ctx_valid.device)
            mask = torch.cat([ctx_valid, block], dim=1)[:, None, None, :]
        h = self.backbone(self.embed_tokens(tokens), positions, kv, mask)
        return h[:, n - self.num_drafts:]
