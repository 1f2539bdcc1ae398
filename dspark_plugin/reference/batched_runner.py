"""Batched reference decoding: several requests at once, per-request verify lengths from the scheduler.

Same drafter, verification and KV handling as `runner.ReferenceRunner`, but R requests share each
target forward, so load matters and the confidence scheduler (policy/verify_planner.py) can trade verified
tokens against step time. Every request drafts the full block; the scheduler only decides how
long a prefix each request verifies this step.

Target KV layout. All rows append their 1 + max_r l_r new slots at the same physical offset; a
per-row validity mask hides slots a row never filled (shorter verify, right padding of prompts)
or whose drafts were rejected. Logical positions go in `position_ids`, so holes never shift RoPE.
The attention mask is built here as an additive 4D mask (HF uses a prepared 4D mask as is); every
query may attend to its own slot, so no softmax row is empty, and padded queries stay finite.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence, Union

import torch
from torch import nn

from dspark_plugin.decode.draft import DraftBlock, draft_block
from dspark_plugin.decode.sampling import logits_to_probs, sample
from dspark_plugin.decode.taps import gather_taps
from dspark_plugin.decode.verify import verify_greedy, verify_rejection
from dspark_plugin.errors import DSparkError
from dspark_plugin.model.drafter import ContextCache, DSparkDrafter
from dspark_plugin.policy.draft_gate import DraftGate
from dspark_plugin.policy.step_rate import SPSCurve, hf_verify_step, measure_sps
from dspark_plugin.policy.verify_planner import MODES, AsyncScheduler, schedule_verify_lengths
from dspark_plugin.reference.runner import GenerationResult, bind_drafter, truncate

# survival [R, gamma] -> verify lengths [R]; any scheduler can be plugged in this way.
ScheduleFn = Callable[[torch.Tensor], torch.Tensor]
SchedulerSpec = Union[str, ScheduleFn]


@dataclasses.dataclass
class StepRecord:
    """What one engine step saw, for observers (calibration data collection, diagnostics)."""
    rows: torch.Tensor                    # [R] request index of each active row
    block: DraftBlock | None              # the drafted full blocks (None: target-only or drafter failed)
    verify_len: torch.Tensor              # [R] drafts verified per row
    target_logits: torch.Tensor           # [R, 1 + max verify_len, V] float32
    verify: object                        # the VerifyResult


@dataclasses.dataclass
class BatchResult:
    results: list[GenerationResult]       # one per request, in input order
    num_steps: int = 0                    # target forwards after prefill
    batch_tokens: list[int] = dataclasses.field(default_factory=list)   # B = sum_r (1 + l_r) per step
    batch_requests: list[int] = dataclasses.field(default_factory=list)  # R per step
    seconds: float = 0.0

    @property
    def mean_verify_len(self) -> float:
        """Mean drafted tokens verified per request per step."""
        return (sum(self.batch_tokens) - sum(self.batch_requests)) / max(sum(self.batch_requests), 1)

    @property
    def tokens_per_second(self) -> float:
        return sum(len(r.tokens) for r in self.results) / max(self.seconds, 1e-9)


class BatchedRunner:
    """R requests decoded together with an HF causal LM target and an optional DSpark drafter.

    scheduler: "early_stop" (Algorithm 1, default), "async" (AsyncScheduler), "fixed" (always the
        full block), "full_search" (biased, for ablations only) or a callable survival -> lengths.
        Drafters without a confidence head always verify the full block.
    sps: the SPS curve (SPSCurve or callable B -> steps/s). None: measured on this target the first
        time the scheduler needs it (a few timed forwards), kept for the runner's lifetime.
    draft_gate: a `DraftGate` (policy/draft_gate.py) that may skip a step's whole draft when drafting has
        been earning fewer tokens/s at this batch size; None (default) drafts every step.
    """

    def __init__(self, target: nn.Module, drafter: DSparkDrafter | None = None, gamma: int | None = None,
                 scheduler: SchedulerSpec = "early_stop", sps: SPSCurve | Callable[[int], float] | None = None,
                 draft_gate: DraftGate | None = None):
        self.target = target.eval()
        self.drafter = drafter
        self.gamma = bind_drafter(target, drafter, gamma)
        if not callable(scheduler) and scheduler not in MODES + ("async",):
            raise DSparkError(f"scheduler: unknown {scheduler!r}; expected one of {MODES + ('async',)} or a callable")
        self.scheduler = scheduler
        self.sps = sps
        self._async: AsyncScheduler | None = None
        self.draft_gate = draft_gate

    # -- scheduling ---------------------------------------------------------------------------
    def _sps(self, max_b: int):
        if self.sps is None:
            sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_b} | {max_b})
            self.sps = measure_sps(hf_verify_step(self.target, context_len=32), sizes, repeats=2)
        return self.sps

    def _verify_lengths(self, block: DraftBlock | None, R: int) -> torch.Tensor:
        if block is None:
            return torch.zeros(R, dtype=torch.long)
        full = torch.full((R,), self.gamma, dtype=torch.long)
        if block.confidence is None or self.scheduler == "fixed":
            lengths = full
        else:
            survival = block.survival[:, : self.gamma].float().cpu()
            # Unusable drafts must not take budget from the others: survival 0 is never admitted.
            survival = torch.where(block.ok.cpu()[:, None], survival, torch.zeros_like(survival))
            if callable(self.scheduler):
                lengths = torch.as_tensor(self.scheduler(survival), dtype=torch.long).cpu()
            elif self.scheduler == "async":
                if self._async is None:
                    self._async = AsyncScheduler(self._sps(R * (1 + self.gamma)))
                self._async.sps = self._sps(R * (1 + self.gamma))
                lengths = self._async.schedule(survival)
            else:
                lengths = schedule_verify_lengths(survival, self._sps(R * (1 + self.gamma)), self.scheduler)
        return torch.where(block.ok.cpu(), lengths.clamp(0, self.gamma), torch.zeros_like(lengths))

    # -- target forward with a hole-tolerant KV layout -------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, valid_past: torch.Tensor,
                 valid_new: torch.Tensor, cache):
        """ids [R, Q] at logical `positions`; keys = past slots (valid_past [R, P]) + the Q new ones."""
        R, Q = ids.shape
        dev = ids.device
        q = torch.arange(Q, device=dev)
        causal = q[None, :] <= q[:, None]                                  # [Q, Q] key <= query
        new = (causal[None] & valid_new[:, None, :]) | torch.eye(Q, dtype=torch.bool, device=dev)[None]
        allowed = torch.cat([valid_past[:, None, :].expand(R, Q, -1), new], dim=2)[:, None]
        dtype = next(self.target.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        return self.target(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache,
                           use_cache=True, output_hidden_states=self.drafter is not None)

    def _append_context(self, ctx: ContextCache, hidden_states, positions: torch.Tensor, counts: torch.Tensor) -> None:
        width = int(counts.max())
        taps = gather_taps(hidden_states, self.drafter.cfg.target_layer_ids)[:, :width]
        ctx.append(self.drafter.context_kv(taps, positions[:, :width]), counts)

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_ids: set[int] | None = None,
        observer: Callable[[StepRecord], None] | None = None,
    ) -> BatchResult:
        from transformers import DynamicCache

        if not prompts or any(len(p) == 0 for p in prompts):
            raise DSparkError("batched runner: every prompt needs at least one token")
        device = next(self.target.parameters()).device
        eos = set(eos_token_ids or ())
        gen = torch.Generator(device=device).manual_seed(seed)
        greedy = temperature <= 0
        t0 = time.perf_counter()
        n = len(prompts)
        out_results = [GenerationResult(tokens=[]) for _ in range(n)]
        batch = BatchResult(results=out_results)
        self._async = None  # a new batch has no stale budgets
        if self.draft_gate is not None:
            self.draft_gate.reset()  # the gap since the last batch is not a step

        # Prefill, right-padded: row r's prompt fills slots 0..len_r-1.
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        width = int(lens.max())
        ids = torch.zeros(n, width, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        valid = torch.arange(width, device=device)[None, :] < lens[:, None]
        positions = torch.arange(width, device=device)[None, :].expand(n, -1)
        cache = DynamicCache()
        out = self._forward(ids, positions, valid[:, :0], valid, cache)
        last = out.logits[torch.arange(n, device=device), lens - 1].float()
        probs = logits_to_probs(last, temperature, top_k, top_p)
        first = probs.argmax(-1) if greedy else sample(probs, gen)
        ctx = None
        if self.drafter is not None:
            ctx = ContextCache(batch_size=n)
            self._append_context(ctx, out.hidden_states, positions, lens.cpu())

        rows = torch.arange(n)                    # request index of each active row
        pos = lens.clone()                        # logical length cached per row
        anchor = first.clone()
        for r in range(n):
            out_results[r].tokens.append(int(first[r]))
        done = [int(first[r]) in eos or max_new_tokens <= 1 for r in range(n)]

        while True:
            keep = torch.tensor([not done[int(r)] for r in rows], dtype=torch.bool)
            if not keep.all():
                idx = keep.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                cache.batch_select_indices(idx.to(device))
                valid, pos, anchor, rows = valid[idx.to(device)], pos[idx.to(device)], anchor[idx.to(device)], rows[idx]
                if ctx is not None:
                    ctx.keep_rows(idx)
            R = rows.numel()

            block = None
            gated = self.draft_gate is not None and self.drafter is not None
            skip = gated and not self.draft_gate.decide(R, time.perf_counter())
            if self.drafter is not None and not skip:
                try:
                    block = draft_block(self.drafter, ctx, anchor, pos, temperature, top_k, top_p, gen)
                except Exception:  # a failing drafter must never take generation down with it
                    block = None
            lengths = self._verify_lengths(block, R) if self.drafter is not None else torch.zeros(R, dtype=torch.long)
            Q = 1 + int(lengths.max())
            lengths_d = lengths.to(device)
            j = torch.arange(Q, device=device)
            drafts = block.tokens[:, : Q - 1] if block is not None else anchor.new_empty(R, 0)
            step_ids = torch.cat([anchor[:, None], drafts], dim=1)
            filled = j[None, :] <= lengths_d[:, None]
            step_ids = torch.where(filled, step_ids, torch.zeros_like(step_ids))
            step_pos = pos[:, None] + j[None, :]
            out = self._forward(step_ids, step_pos, valid, filled, cache)

            logits = out.logits.float()
            if greedy:
                res = verify_greedy(drafts, logits, lengths_d)
            else:
                target_probs = logits_to_probs(logits, temperature, top_k, top_p)
                draft_probs = block.probs[:, : Q - 1] if block is not None else target_probs[:, :0]
                res = verify_rejection(drafts, draft_probs, target_probs, lengths_d, gen)
            if observer is not None:
                observer(StepRecord(rows=rows, block=block, verify_len=lengths, target_logits=logits, verify=res))
            if gated:  # the tokens this step emitted: one per request + the accepted drafts
                self.draft_gate.emitted(R + int(res.num_accepted.sum()))
            kept = res.num_accepted + 1                                   # anchor slot + accepted drafts
            used = int(kept.max())
            if used < Q:
                cache.crop(-(Q - used))
            valid = torch.cat([valid, (j[None, :] < kept[:, None])[:, :used]], dim=1)
            if ctx is not None:
                self._append_context(ctx, out.hidden_states, step_pos, kept.cpu())
            pos = pos + kept
            anchor = res.tokens.gather(1, res.num_accepted[:, None]).squeeze(1)

            batch.num_steps += 1
            batch.batch_requests.append(R)
            batch.batch_tokens.append(R + int(lengths.sum()))
            for i in range(R):
                r = int(rows[i])
                result = out_results[r]
                emitted = res.emitted(i)
                result.tokens.extend(emitted)
                result.num_rounds += 1
                result.accepted.append(int(res.num_accepted[i]))
                result.verified.append(int(lengths[i]))
                if (block is None and not skip) or (block is not None and not bool(block.ok[i])):
                    result.fallbacks += self.drafter is not None
                if len(result.tokens) >= max_new_tokens or any(t in eos for t in emitted):
                    done[r] = True

        for result in out_results:
            result.tokens = truncate(result.tokens, max_new_tokens, eos)
        batch.seconds = time.perf_counter() - t0
        for result in out_results:
            result.seconds = batch.seconds
        return batch
