"""Sequential heads (vanilla / gated Markov, RNN) and the confidence head (docs/algorithm.md §1.3-1.4).

Every head turns the previous token x_{k-1} and the backbone state h_k into a bias B_k added to
the base logits U_k; it is the only left-to-right part of drafting, so it is kept tiny.
"""
from __future__ import annotations

import torch
from torch import nn

from dspark_plugin.config.drafter_config import DSparkConfig

State = torch.Tensor | None


class VanillaMarkovHead(nn.Module):
    """B_k = W2 . W1[x_{k-1}]. W1 reads target token ids; W2 writes the (possibly pruned) draft vocabulary."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, draft_vocab_size: int | None = None):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab_size or vocab_size, bias=False)

    def init_state(self, h: torch.Tensor) -> State:
        return None

    def latent(self, w1_prev: torch.Tensor, h: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return w1_prev, state

    def step(self, prev_tokens: torch.Tensor, h: torch.Tensor, state: State):
        """prev_tokens [B], h [B, d] -> (bias [B, V], new state, W1[x_{k-1}] [B, r])."""
        w1_prev = self.markov_w1(prev_tokens)
        z, state = self.latent(w1_prev, h.to(w1_prev.dtype), state)
        return self.markov_w2(z), state, w1_prev


class GatedMarkovHead(VanillaMarkovHead):
    """B_k = W2(sigmoid(gate_proj([h_k; W1[x_{k-1}]])) * W1[x_{k-1}])."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, draft_vocab_size: int | None = None):
        super().__init__(vocab_size, rank, hidden_size, draft_vocab_size)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)

    def latent(self, w1_prev, h, state):
        return torch.sigmoid(self.gate_proj(torch.cat([h, w1_prev], -1))) * w1_prev, state


class RNNHead(VanillaMarkovHead):
    """z = [s; W1[x_{k-1}]; h]; gate/candidate/output = joint_proj(z); B_k = W2(tanh(O))."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, draft_vocab_size: int | None = None):
        super().__init__(vocab_size, rank, hidden_size, draft_vocab_size)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def init_state(self, h: torch.Tensor) -> State:
        return h.new_zeros(h.shape[0], self.markov_w1.embedding_dim, dtype=self.markov_w1.weight.dtype)

    def latent(self, w1_prev, h, state):
        g, c, o = self.joint_proj(torch.cat([state, w1_prev, h], -1)).chunk(3, dim=-1)
        g = torch.sigmoid(g)
        return torch.tanh(o), g * state + (1.0 - g) * torch.tanh(c)


HEADS = {"vanilla": VanillaMarkovHead, "gated": GatedMarkovHead, "rnn": RNNHead}


def build_markov_head(cfg: DSparkConfig) -> VanillaMarkovHead | None:
    if not cfg.has_markov:
        return None
    return HEADS[cfg.markov_head_type](cfg.vocab_size, cfg.markov_rank, cfg.hidden_size, cfg.draft_vocab)


class ConfidenceHead(nn.Module):
    """c_k = sigmoid(w . [h_k; W1[x_{k-1}]] + b): will draft token k survive, given tokens < k did."""

    def __init__(self, hidden_size: int, rank: int, with_markov: bool):
        super().__init__()
        self.with_markov = with_markov
        self.proj = nn.Linear(hidden_size + (rank if with_markov else 0), 1)

    def logit(self, h: torch.Tensor, w1_prev: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([h, w1_prev.to(h.dtype)], -1) if self.with_markov else h
        return self.proj(x.to(self.proj.weight.dtype)).squeeze(-1)


def build_confidence_head(cfg: DSparkConfig) -> ConfidenceHead | None:
    if not cfg.enable_confidence_head:
        return None
    return ConfidenceHead(cfg.hidden_size, cfg.markov_rank, cfg.confidence_head_with_markov)
