"""The sequential-head and confidence-head tensors the kernels read, gathered once from a drafter."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class HeadWeights:
    head_type: str                      # "vanilla" | "gated" | "rnn"
    w1: torch.Tensor                    # markov_w1.weight [V, r]
    w2: torch.Tensor                    # markov_w2.weight [V, r]
    proj_w: torch.Tensor | None = None  # gated: gate_proj.weight [r, d+r]; rnn: joint_proj.weight [3r, 2r+d]
    proj_b: torch.Tensor | None = None
    conf_w: torch.Tensor | None = None  # confidence_head.proj.weight [1, d(+r)]
    conf_b: torch.Tensor | None = None  # confidence_head.proj.bias [1]
    conf_with_markov: bool = True

    @property
    def rank(self) -> int:
        return self.w1.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.w2.shape[0]

    @classmethod
    def from_drafter(cls, drafter) -> "HeadWeights":
        """Views (no copies) of a DSparkDrafter's markov_head / confidence_head parameters."""
        head, conf = drafter.markov_head, drafter.confidence_head
        if head is None:
            raise ValueError("the fused drafting kernels need a Markov head (markov_rank > 0)")
        kind = {"VanillaMarkovHead": "vanilla", "GatedMarkovHead": "gated", "RNNHead": "rnn"}[type(head).__name__]
        proj = getattr(head, "gate_proj", None) or getattr(head, "joint_proj", None)
        return cls(
            head_type=kind,
            w1=head.markov_w1.weight.detach(),
            w2=head.markov_w2.weight.detach(),
            proj_w=None if proj is None else proj.weight.detach(),
            proj_b=None if proj is None or proj.bias is None else proj.bias.detach(),
            conf_w=None if conf is None else conf.proj.weight.detach(),
            conf_b=None if conf is None else conf.proj.bias.detach(),
            conf_with_markov=bool(conf.with_markov) if conf is not None else True,
        )
