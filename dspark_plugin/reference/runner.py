"""Engine-free reference runner: a Hugging Face causal LM target + a DSpark drafter, batch 1.

It is the correctness oracle for the engine adapters: same drafter, heads and verification, no
engine in between. Each round: draft a full block from the anchor, verify a prefix with one
target forward, crop the target's KV cache to what was accepted, append the accepted positions'
tapped states to the drafter's context cache. With `context_lookup`, each round also looks for a
copy in the request's own tokens and keeps it where it should survive longer (the same core
functions as the vLLM proposer: decode/context_lookup, policy/lookup_choice).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch import nn

from dspark_plugin.decode.context_lookup import find_continuation
from dspark_plugin.decode.draft import DraftBlock, draft_block
from dspark_plugin.decode.sampling import logits_to_probs, sample
from dspark_plugin.decode.taps import gather_taps
from dspark_plugin.decode.verify import verify_greedy, verify_rejection
from dspark_plugin.errors import DSparkError
from dspark_plugin.model.drafter import ContextCache, DSparkDrafter
from dspark_plugin.policy.lookup_choice import LookupAcceptance, choose_drafts

# (draft block, gamma) -> how many drafted tokens to verify; the scheduler plugs in here.
VerifyLenFn = Callable[[DraftBlock, int], int]


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]                     # new tokens only, truncated at max_new_tokens / EOS
    num_rounds: int = 0                   # target forwards after prefill
    accepted: list[int] = dataclasses.field(default_factory=list)   # drafts accepted per round
    verified: list[int] = dataclasses.field(default_factory=list)   # drafts verified per round
    copied: int = 0                       # rounds that verified a copy from the context (lookup)
    fallbacks: int = 0                    # rounds where the draft was unusable (non-finite / failed)
    seconds: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per target forward, bonus included."""
        return (sum(self.accepted) + len(self.accepted)) / max(len(self.accepted), 1)


def truncate(tokens: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """A round may overshoot: keep at most max_new_tokens, ending at the first EOS (kept)."""
    tokens = tokens[:max_new_tokens]
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def bind_drafter(target: nn.Module, drafter: DSparkDrafter | None, gamma: int | None) -> int:
    """Share the target's embedding / LM head with the drafter; the drafts per round (0 without one)."""
    if drafter is None:
        return 0
    if drafter._embed_tokens is None:
        drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())
    gamma = drafter.num_drafts if gamma is None else gamma
    if not 1 <= gamma <= drafter.num_drafts:
        raise DSparkError(f"gamma={gamma} must be in 1..{drafter.num_drafts} (the drafter's block)")
    return gamma


class ReferenceRunner:
    def __init__(self, target: nn.Module, drafter: DSparkDrafter | None = None,
                 gamma: int | None = None, verify_len_fn: VerifyLenFn | None = None,
                 context_lookup: bool = False):
        self.target = target.eval()
        self.drafter = drafter
        self.gamma = bind_drafter(target, drafter, gamma)
        self.verify_len_fn = verify_len_fn
        # Learned across the requests of this runner, as a server learns across its traffic.
        self.lookup = LookupAcceptance(self.gamma) if context_lookup and drafter is not None else None

    def _forward(self, ids: torch.Tensor, cache, start: int):
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        return self.target(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=positions,
                           output_hidden_states=self.drafter is not None)

    def _append_context(self, ctx: ContextCache, hidden_states, start: int, count: int) -> None:
        taps = gather_taps(hidden_states, self.drafter.cfg.target_layer_ids)[:, :count]
        positions = torch.arange(start, start + count, device=taps.device)[None]
        ctx.append(self.drafter.context_kv(taps, positions), torch.tensor([count]))

    @torch.inference_mode()
    def generate(
        self,
        input_ids: list[int] | torch.Tensor,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_ids: set[int] | None = None,
    ) -> GenerationResult:
        device = next(self.target.parameters()).device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).view(1, -1)
        eos = set(eos_token_ids or ())
        gen = torch.Generator(device=device).manual_seed(seed)
        result = GenerationResult(tokens=[])
        t0 = time.perf_counter()

        from transformers import DynamicCache
        cache = DynamicCache()
        out = self._forward(ids, cache, 0)
        probs = logits_to_probs(out.logits[:, -1], temperature, top_k, top_p)
        result.tokens.append(int(probs.argmax(-1)) if temperature <= 0 else int(sample(probs, gen)))
        length = ids.shape[1]  # tokens whose K/V the target has cached
        ctx = None
        if self.drafter is not None:
            ctx = ContextCache(batch_size=1)
            self._append_context(ctx, out.hidden_states, 0, length)

        while len(result.tokens) < max_new_tokens and result.tokens[-1] not in eos:
            anchor = torch.tensor([result.tokens[-1]], device=device)
            if self.drafter is None:
                out = self._forward(anchor[None], cache, length)
                probs = logits_to_probs(out.logits[:, -1], temperature, top_k, top_p)
                result.tokens.append(int(probs.argmax(-1)) if temperature <= 0 else int(sample(probs, gen)))
                length += 1
                result.num_rounds += 1
                result.accepted.append(0)
                result.verified.append(0)
                continue
            history = ids[0].tolist() + result.tokens if self.lookup is not None else None
            emitted = self._speculative_round(anchor, length, cache, ctx, temperature, top_k, top_p, gen, result,
                                              history)
            length += len(emitted)
            result.tokens.extend(emitted)
            if any(t in eos for t in emitted):  # an EOS accepted mid-block ends the request too
                break

        result.tokens = truncate(result.tokens, max_new_tokens, eos)
        result.seconds = time.perf_counter() - t0
        return result

    def _with_copy(self, block: DraftBlock, history: list[int], temperature: float) -> tuple[DraftBlock, tuple | None]:
        """The drafter's block, or the context's copy where that should survive longer."""
        g = self.gamma
        found = find_continuation(history, g)
        conf = block.confidence[:, :g] if block.confidence is not None else None
        probs = block.probs[:, :g] if block.probs is not None else None
        chosen = choose_drafts(block.tokens[:, :g], conf, probs, [found], self.lookup, sampled=[temperature > 0])
        return DraftBlock(chosen.tokens, chosen.probs, chosen.confidence, block.ok), chosen.copied[0]

    def _speculative_round(self, anchor, pos, cache, ctx, temperature, top_k, top_p, gen, result,
                           history: list[int] | None = None) -> list[int]:
        """Draft, verify, and commit one round; returns the emitted tokens (accepted + bonus)."""
        block, copied = None, None
        try:
            block = draft_block(self.drafter, ctx, anchor, torch.tensor([pos]), temperature, top_k, top_p, gen)
            ok = bool(block.ok[0])
            if ok and history is not None:
                block, copied = self._with_copy(block, history, temperature)
        except Exception:  # a failing drafter must never take generation down with it
            ok = False
        n_verify = 0
        if ok:
            n_verify = self.gamma if self.verify_len_fn is None else int(self.verify_len_fn(block, self.gamma))
            n_verify = max(0, min(n_verify, self.gamma))
        else:
            result.fallbacks += 1
        drafts = block.tokens[:, :n_verify] if ok else anchor.new_empty(1, 0)
        out = self._forward(torch.cat([anchor[None], drafts], dim=1), cache, pos)
        verify_len = torch.tensor([n_verify], device=anchor.device)
        if temperature <= 0:
            res = verify_greedy(drafts, out.logits.float(), verify_len)
        else:
            target_probs = logits_to_probs(out.logits, temperature, top_k, top_p)
            draft_probs = block.probs[:, :n_verify] if ok else target_probs[:, :0]
            res = verify_rejection(drafts, draft_probs, target_probs, verify_len, gen)
        n_acc = int(res.num_accepted[0])
        surplus = cache.get_seq_length() - (pos + 1 + n_acc)
        if surplus > 0:  # rejected drafts leave the target's cache
            cache.crop(-surplus)
        self._append_context(ctx, out.hidden_states, pos, 1 + n_acc)
        result.num_rounds += 1
        result.accepted.append(n_acc)
        result.verified.append(n_verify)
        if copied is not None and n_verify:
            self.lookup.observe_copy(copied, n_verify, n_acc)
            result.copied += 1
        return res.emitted(0)
