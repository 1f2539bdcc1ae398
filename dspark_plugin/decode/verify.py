"""Verification of a drafted prefix of any length 0..gamma (docs/algorithm.md §1.6).

Greedy: accept while the draft equals the target argmax. Sampling: accept x_k with probability
min(1, p_t(x_k) / p_d(x_k)); at the first rejection resample from normalise(max(0, p_t - p_d));
if every verified token passes, the bonus comes from p_t at the next position. Positions beyond
`verify_len` are never looked at, so a shorter verified prefix stays lossless.

Both go through kernels.dispatch: the Triton acceptance kernels on CUDA tensors, their PyTorch
twins elsewhere. The randomness is drawn here, from the caller's generator, and handed to either
backend as uniforms (u_accept [B, g], then u_sample [B] for the inverse-CDF draw of the
correction / bonus token), so both backends make the same choice for the same generator state.
"""
from __future__ import annotations

import dataclasses

import torch

from dspark_plugin.kernels import dispatch as kernels


@dataclasses.dataclass
class VerifyResult:
    tokens: torch.Tensor        # [B, g+1]: accepted drafts, then the correction/bonus token; -1 after
    num_accepted: torch.Tensor  # [B]

    @property
    def num_emitted(self) -> torch.Tensor:
        return self.num_accepted + 1

    def emitted(self, row: int) -> list[int]:
        return self.tokens[row, : int(self.num_accepted[row]) + 1].tolist()


def _verify_len(verify_len: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
    # A length above g would make "stopped before verify_len" look like a rejection after the last
    # draft (a correction drawn where a bonus belongs) and the kernels would read past the row;
    # g means "all of them", so clamp rather than trust every caller.
    return verify_len.to(device=draft_tokens.device, dtype=torch.int64).clamp(0, draft_tokens.shape[1])


def verify_greedy(
    draft_tokens: torch.Tensor, target_logits: torch.Tensor, verify_len: torch.Tensor
) -> VerifyResult:
    """draft_tokens [B, g], target_logits [B, g+1, V] (position j predicts the token after draft j-1)."""
    tokens, n = kernels.accept_greedy(draft_tokens, target_logits, _verify_len(verify_len, draft_tokens))
    return VerifyResult(tokens=tokens, num_accepted=n)


def verify_rejection(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    verify_len: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """draft_probs [B, g, V] (what each draft was sampled from), target_probs [B, g+1, V]."""
    b, g = draft_tokens.shape
    dev = draft_tokens.device
    # One uniform per draft position, drawn for every position whether verified or not, so the
    # generator advances the same way for any verify_len (acceptance of x_k uses u_k only).
    u_accept = torch.rand((b, g), generator=generator, device=dev)
    u_sample = torch.rand((b,), generator=generator, device=dev)
    tokens, n = kernels.accept_rejection(draft_tokens, draft_probs, target_probs,
                                         _verify_len(verify_len, draft_tokens), u_accept, u_sample)
    return VerifyResult(tokens=tokens, num_accepted=n)
