"""Parallel backbone: `H_ctx = hidden_norm(fc([H_l1; ...; H_lm]))`, draft layers, final norm."""
from __future__ import annotations

import torch
from torch import nn

from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.model.layers import DraftLayer, RMSNorm, RotaryEmbedding

KV = list[tuple[torch.Tensor, torch.Tensor]]


class DSparkBackbone(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.num_taps * cfg.tapped_hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def context_features(self, taps: torch.Tensor) -> torch.Tensor:
        """taps: [B, L, m*d_target] -> H_ctx [B, L, d]."""
        return self.hidden_norm(self.fc(taps.to(self.fc.weight.dtype)))

    def context_kv(self, taps: torch.Tensor, positions: torch.Tensor) -> KV:
        """Per-layer (K, V) [B, Hkv, L, Dh] of tapped target states at `positions` [B, L]."""
        h_ctx = self.context_features(taps)
        return [layer.context_kv(h_ctx, positions, self.rope) for layer in self.layers]

    def forward(
        self,
        block_embeds: torch.Tensor,
        positions: torch.Tensor,
        ctx_kv: KV | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """block_embeds [B, Lq, d] at `positions` [B, Lq] -> final-normed hidden h [B, Lq, d].

        `mask` (bool [B, 1, Lq, Lc + Lq], True = attend) says which context and block positions
        each query sees; None means everything (one block per row, all context before it).
        """
        x = block_embeds.to(self.fc.weight.dtype)
        for i, layer in enumerate(self.layers):
            k, v = ctx_kv[i] if ctx_kv is not None else (None, None)
            x = layer(x, positions, self.rope, k, v, mask)
        return self.norm(x)
