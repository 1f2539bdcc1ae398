"""Semi-parallel drafting: one backbone pass, then the sequential head left to right (docs/algorithm.md §1.3)."""
from __future__ import annotations

import dataclasses

import torch

from dspark_plugin.decode.draft_vocab import to_target_vocab
from dspark_plugin.decode.sampling import Generators, logits_to_probs, row_seeds, sample
from dspark_plugin.kernels import dispatch as kernels
from dspark_plugin.model.drafter import ContextCache, DSparkDrafter


@dataclasses.dataclass
class DraftBlock:
    tokens: torch.Tensor                  # [B, g]
    probs: torch.Tensor | None            # [B, g, V] draft distributions (None when greedy)
    confidence: torch.Tensor | None       # [B, g] calibrated c_k (None without a confidence head)
    ok: torch.Tensor                      # [B] False where the draft was non-finite: verify nothing

    @property
    def survival(self) -> torch.Tensor | None:
        """Prefix survival a_k = prod_{i<=k} c_i."""
        return None if self.confidence is None else self.confidence.cumprod(dim=-1)


def _fused_draft(
    drafter: DSparkDrafter,
    base: torch.Tensor,
    h: torch.Tensor,
    anchor: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int,
    greedy: bool,
    generator: Generators,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Markov-head drafting through kernels.dispatch -> (tokens, probs, conf_logits, ok).

    One draft_block launch where dispatch.use_block_loop says so, else one markov_step per
    position; both compute the same block (the twin of either is the same per-step function).
    Sampling is Gumbel-max keyed by one seed per request and block, drawn from `generator` (or
    from each row's own generator).
    """
    b, g, _ = h.shape
    weights = kernels.HeadWeights.from_drafter(drafter)
    temps = kernels.per_row(temperature, b, h.device, torch.float32)
    seeds = torch.zeros(b, dtype=torch.int64, device=h.device)
    if not greedy:
        seeds = row_seeds(b, generator, h.device)
    ids = getattr(drafter, "draft_to_target", None)
    if ids is None and kernels.use_block_loop(base, top_k):  # the block kernel feeds draft ids back itself
        blk = kernels.draft_block(weights, base, h, anchor, temps, seeds, 0, top_k,
                                  want_probs=not greedy, sample=not greedy)
        return blk.tokens.to(anchor.dtype), blk.probs, blk.conf_logits, blk.finite.all(-1)
    tokens = anchor.new_empty(b, g)
    probs = None if greedy else base.new_empty(b, g, base.shape[-1])
    conf_logits = base.new_empty(b, g) if drafter.confidence_head is not None else None
    state = drafter.markov_head.init_state(h[:, 0])
    prev = anchor
    ok = torch.ones(b, dtype=torch.bool, device=h.device)
    for k in range(g):
        out = kernels.markov_step(weights, base[:, k], prev, h[:, k], state, temps, seeds, k,
                                  top_k, want_probs=not greedy, sample=not greedy)
        prev, state = (out.token if ids is None else ids[out.token]), out.state
        if conf_logits is not None:
            conf_logits[:, k] = out.conf_logit
        if probs is not None:
            probs[:, k] = out.probs
        tokens[:, k] = prev
        ok = ok & out.finite
    return tokens, probs, conf_logits, ok


def _loop_draft(
    drafter: DSparkDrafter,
    base: torch.Tensor,
    h: torch.Tensor,
    anchor: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int,
    top_p: float,
    greedy: bool,
    generator: Generators,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The modules' own step loop with torch sampling -> (tokens, probs, conf_logits, ok)."""
    b, g, _ = h.shape
    head, conf_head = drafter.markov_head, drafter.confidence_head
    ids = getattr(drafter, "draft_to_target", None)
    tokens = anchor.new_empty(b, g)
    probs = None if greedy else base.new_empty(b, g, base.shape[-1])
    conf_logits = base.new_empty(b, g) if conf_head is not None else None
    state = head.init_state(h[:, 0]) if head is not None else None
    prev = anchor
    ok = torch.ones(b, dtype=torch.bool, device=h.device)
    for k in range(g):
        logits, w1_prev = base[:, k], None
        if head is not None:
            bias, state, w1_prev = head.step(prev, h[:, k], state)
            logits = logits + bias.float()
        if conf_head is not None:
            conf_logits[:, k] = conf_head.logit(h[:, k], w1_prev).float()
        if greedy:
            prev = logits.argmax(-1)
        else:
            probs[:, k] = logits_to_probs(logits, temperature, top_k, top_p)
            prev = sample(probs[:, k], generator)
        if ids is not None:  # draft id -> target id: W1 and the verifier read target ids
            prev = ids[prev]
        tokens[:, k] = prev
        ok = ok & torch.isfinite(logits).all(-1)
    return tokens, probs, conf_logits, ok


def sequential_draft(
    drafter: DSparkDrafter,
    h: torch.Tensor,
    anchor: torch.Tensor,
    temperature: float | torch.Tensor = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Generators = None,
) -> DraftBlock:
    """h [B, g, d] final-normed backbone states, anchor [B] = x_0 -> a drafted block.

    With a pruned draft vocabulary (`drafter.draft_to_target`), the LM head and Markov bias score
    only those tokens; drafted tokens come back as target ids and draft probabilities over the
    target's vocabulary (zero outside the subset), which rejection sampling accepts as they are.
    """
    g = h.shape[1]
    base = drafter.lm_head(h).float()                       # U_k for all positions at once
    greedy = bool((torch.as_tensor(temperature) <= 0).all())
    # Markov heads run fused steps: the Triton kernels on CUDA, else their PyTorch twin, which for
    # greedy is exactly the modules' loop. CPU sampling keeps the modules' loop (torch.multinomial
    # is faster there than the twin's hash noise), as do top-p and head-less drafters.
    fused = drafter.markov_head is not None and top_p >= 1.0 and (greedy or kernels.backend(base) == "triton")
    if fused:
        tokens, probs, conf_logits, ok = _fused_draft(drafter, base, h, anchor, temperature, top_k, greedy, generator)
    else:
        tokens, probs, conf_logits, ok = _loop_draft(drafter, base, h, anchor, temperature, top_k, top_p, greedy,
                                                     generator)
    ids = getattr(drafter, "draft_to_target", None)
    if probs is not None and ids is not None:  # draft-space distributions -> the target's vocabulary
        probs = to_target_vocab(probs, ids, drafter.target_vocab_size)
    confidence = None
    if conf_logits is not None:
        temps = drafter.confidence_temperatures
        if temps is not None:
            conf_logits = conf_logits / temps[:g].to(conf_logits)
        confidence = torch.sigmoid(conf_logits)
        ok = ok & torch.isfinite(confidence).all(-1)
    if probs is not None:
        ok = ok & torch.isfinite(probs).all(-1).all(-1)
    return DraftBlock(tokens=tokens, probs=probs, confidence=confidence, ok=ok)


def draft_block(
    drafter: DSparkDrafter,
    cache: ContextCache,
    anchor: torch.Tensor,
    anchor_pos: torch.Tensor,
    temperature: float | torch.Tensor = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Generators = None,
) -> DraftBlock:
    """Draft gamma tokens after `anchor` (at `anchor_pos`) from the drafter's context cache."""
    h = drafter.block_hidden(cache, anchor, anchor_pos)
    return sequential_draft(drafter, h, anchor, temperature, top_k, top_p, generator)
