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

        def flat(t: torch.Tensor | None) -> torch.Tensor | None:
            # the kernels index rows with plain strides; a no-op for ordinary parameters
            return None if t is None else t.detach().contiguous()

        return cls(
            head_type=kind,
            w1=flat(head.markov_w1.weight),
            w2=flat(head.markov_w2.weight),
            proj_w=None if proj is None else flat(proj.weight),
            proj_b=None if proj is None else flat(proj.bias),
            conf_w=None if conf is None else flat(conf.proj.weight),
            conf_b=None if conf is None else flat(conf.proj.bias),
            conf_with_markov=bool(conf.with_markov) if conf is not None else True,
        )
