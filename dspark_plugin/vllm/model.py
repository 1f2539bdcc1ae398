"""vLLM drafter model class for `Qwen3DSparkModel` checkpoints, with every sequential head.

It is vLLM's own `Qwen3DSparkForCausalLM` (the DFlash-style backbone whose draft layers live in
vLLM's paged KV cache, with context K/V injected before the block forward) with the Markov and
confidence heads swapped for the core's modules (`dspark_plugin.model.heads`). The tensor names are the
same, so vanilla checkpoints load exactly as in vLLM, and gated / rnn checkpoints load too.

Two consumers:
- the plugin's V1 proposer (`proposer.py`), which calls `sequential_draft` from the core on
  `head_view()`;
- vLLM 0.33's Model Runner V2 `DSparkSpeculator`, which first asks the model's
  `sample_sequential(speculator, num_reqs, head_hidden)`: vanilla returns False (vLLM's own loop
  runs, unchanged), gated / rnn run the same loop with the core head's `step`.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM

from dspark_plugin.checkpoint.calibration_file import load_confidence_temperatures
from dspark_plugin.config.drafter_config import CONFIG_NAME, DSparkConfig
from dspark_plugin.decode.draft_vocab import target_ids_from_d2t
from dspark_plugin.model.heads import build_confidence_head, build_markov_head


class _LogitsHead(nn.Module):
    """Callable `h -> U` over the (possibly target-shared) vLLM LM head, as the core expects."""

    def __init__(self, owner: "DSparkQwen3ForCausalLM"):
        super().__init__()
        self.__dict__["_owner"] = owner  # not a submodule: the owner already holds lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        logits = self._owner.compute_draft_logits(h.reshape(-1, shape[-1]))
        return logits.view(*shape[:-1], logits.shape[-1])


class HeadView:
    """The attributes `dspark_plugin.decode.draft.sequential_draft` reads from a drafter."""

    def __init__(self, model: "DSparkQwen3ForCausalLM"):
        self.lm_head = _LogitsHead(model)
        self.markov_head = model.model.markov_head
        self.confidence_head = model.model.confidence_head
        self.confidence_temperatures = model.confidence_temperatures
        self.draft_to_target = model.draft_target_ids()   # None unless the draft vocabulary is pruned
        self.target_vocab_size = model.dspark_config.vocab_size


class DSparkQwen3ForCausalLM(Qwen3DSparkForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        source = Path(str(self.draft_model_config.model))
        self.dspark_config = DSparkConfig.from_dict(self.config.to_dict(), source=str(source / CONFIG_NAME))
        # Same tensor names as vLLM's heads (`markov_head.markov_w1.weight`, ...), so the native
        # weight loader fills them; the core modules add gate_proj / joint_proj where needed.
        self.model.markov_head = build_markov_head(self.dspark_config)
        self.model.confidence_head = build_confidence_head(self.dspark_config)
        temps = load_confidence_temperatures(source, self.dspark_config) if source.is_dir() else None
        self.confidence_temperatures: torch.Tensor | None = temps

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Any:
        # The Markov head bypasses vLLM's backbone loader: its stacked-parameter mapping renames
        # every `.gate_proj` to `.gate_up_proj`, which would swallow the gated head's gate.
        head = self.model.markov_head
        head_tensors: dict[str, torch.Tensor] = {}

        def backbone_weights():
            for name, tensor in weights:
                stripped = name.removeprefix("model.")
                if stripped.startswith("markov_head."):
                    head_tensors[stripped.removeprefix("markov_head.")] = tensor
                else:
                    yield name, tensor

        result = super().load_weights(backbone_weights())
        if head is not None:
            state = {k: v.to(dtype=p.dtype) for k, v in head_tensors.items()
                     for p in [head.state_dict()[k]] if k in head.state_dict()}
            head.load_state_dict(state, strict=True)
        return result

    # -- the core's view ---------------------------------------------------------------------
    def head_view(self) -> HeadView:
        return HeadView(self)

    def draft_target_ids(self) -> torch.Tensor | None:
        """Target token id of each draft id (vLLM keeps d2t offsets); None for a full vocabulary."""
        d2t = getattr(self, "draft_id_to_target_id", None)
        if d2t is None:
            return None
        cached = self.__dict__.get("_draft_target_ids")
        if cached is None:  # weights are loaded after __init__: built on first use
            cached = target_ids_from_d2t(d2t.data)
            self.__dict__["_draft_target_ids"] = cached
        return cached

    @property
    def num_drafts(self) -> int:
        return self.dspark_config.num_drafts

    # -- vLLM's native hooks (Model Runner V2 DSparkSpeculator) --------------------------------
    def markov_embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.markov_head.markov_w1(token_ids)

    def markov_bias(self, markov_embed: torch.Tensor) -> torch.Tensor:
        # Only reached for vanilla heads: sample_sequential takes over for gated / rnn.
        return self.model.markov_head.markov_w2(markov_embed) * self.logits_processor.scale

    def apply_markov_bias_gathered(
        self,
        markov_embed: torch.Tensor,
        logits: torch.Tensor,
        values: torch.Tensor,
        index: torch.Tensor,
    ) -> torch.Tensor:
        rows = self.model.markov_head.markov_w2.weight[index]           # [B, k, r]
        bias = torch.bmm(rows, markov_embed.unsqueeze(-1)).squeeze(-1)  # [B, k]
        return logits.scatter_(1, index, values + self.logits_processor.scale * bias.to(values.dtype))

    def compute_confidence(self, head_hidden: torch.Tensor, markov_embed: torch.Tensor) -> torch.Tensor:
        head = self.model.confidence_head
        assert head is not None
        logits = head.logit(head_hidden, markov_embed).float()
        if self.confidence_temperatures is not None:
            n = self.num_drafts
            temps = self.confidence_temperatures.to(logits.device)[:n]
            logits = (logits.view(-1, n) / temps).view(-1)
        return torch.sigmoid(logits)

    def sample_sequential(self, speculator: Any, num_reqs: int, head_hidden: torch.Tensor) -> bool:
        """vLLM >= 0.33 MRV2 hook: run gated / rnn heads; False leaves vanilla to vLLM's loop."""
        head = self.model.markov_head
        if head is None or self.dspark_config.markov_head_type == "vanilla":
            return False
        n = speculator.num_speculative_steps
        num_sample = num_reqs * n
        sample_hidden = head_hidden[speculator.sample_indices[:num_sample]]
        base = self.compute_draft_logits(sample_hidden).view(num_reqs, n, -1)
        h = sample_hidden.view(num_reqs, n, -1)
        idx_map = speculator.sample_idx_mapping[:num_sample].view(num_reqs, n)
        sample_pos = speculator.sample_pos[:num_sample].view(num_reqs, n)
        prev = speculator.input_buffers.input_ids[speculator._anchor_idx[:num_reqs]]
        state = head.init_state(h[:, 0])
        w1_prevs = []
        for i in range(n):
            bias, state, w1_prev = head.step(prev, h[:, i], state)
            w1_prevs.append(w1_prev)
            logits_i = base[:, i] + bias.to(base.dtype)
            if hasattr(self, "apply_output_logit_transform"):
                logits_i = self.apply_output_logit_transform(logits_i)
            prev = speculator._sample_logits(logits_i, idx_map[:, i], sample_pos[:, i], i)
            speculator.draft_tokens[:num_reqs, i] = prev
        if speculator.use_confidence_head:
            conf = self.compute_confidence(sample_hidden, torch.stack(w1_prevs, dim=1).flatten(0, 1))
            speculator.draft_token_confidence_probs[:num_reqs] = conf.view(num_reqs, n)
        return True
