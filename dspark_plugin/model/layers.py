"""Qwen3-shaped draft decoder layer with KV injection (docs/algorithm.md §1.1).

Queries come from the block; keys/values are the layer's own k/v projections of the injected
context features `H_ctx` followed by those of the block. Attention is non-causal inside the
block; which context positions a block may see is the caller's mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dspark_plugin.config.drafter_config import DSparkConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu") / self.head_dim
        return (1.0 / self.theta ** exponent).float()

    def reset_buffers(self) -> None:
        """Recompute inv_freq (it is not in checkpoints; needed after building on the meta device)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, H, L, Dh], positions: [B, L] absolute token positions."""
        freqs = positions[:, None, :, None].float() * self.inv_freq
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class DraftAttention(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        d, h, kv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, dh
        self.q_proj = nn.Linear(d, h * dh, bias=False)
        self.k_proj = nn.Linear(d, kv * dh, bias=False)
        self.v_proj = nn.Linear(d, kv * dh, bias=False)
        self.o_proj = nn.Linear(h * dh, d, bias=False)
        self.q_norm = RMSNorm(dh, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(dh, cfg.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(*x.shape[:2], n, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding):
        """K (normed, rotated) and V for features x [B, L, d] at `positions` [B, L]."""
        k = rope(self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads)), positions)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        return k, v

    def forward(self, x, positions, rope, ctx_k, ctx_v, mask):
        q = rope(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), positions)
        k, v = self.project_kv(x, positions, rope)
        if ctx_k is not None:
            k, v = torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def context_kv(self, h_ctx: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding):
        # Context features are already hidden_norm'ed; they are not re-normed per layer.
        return self.self_attn.project_kv(h_ctx, positions, rope)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        ctx_k: torch.Tensor | None,
        ctx_v: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x: [B, Lq, d]; ctx_k/ctx_v: [B, Hkv, Lc, Dh]; mask: bool [B, 1, Lq, Lc + Lq], True = attend."""
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
