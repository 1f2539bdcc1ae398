"""The PLUGIN_DSPARK speculative worker for SGLang (CPU, synchronous; the drafter's context in SGLang's slots).

SGLang builds it as `DSparkPluginWorker(server_args=, gpu_id=, nccl_port=, target_worker=)` and calls
`forward_batch_generation(batch)` once per scheduler step, on SGLang's V2 schema without overlap:
- extend (prefill, each chunk): the target forward through SGLang's own worker, with the drafter's
  tapped layers captured by the target model itself (`set_dflash_layers_to_capture`: the output of
  decoder layer l, DSpark's tap); the taps become the drafter's context K/V, written at the slots SGLang
  gave those positions (`model/slot_context.SlotContext`, one tensor per drafter layer sized like the
  target's KV pool): a request's context is what its `req_to_token` row lists, so a radix-cache hit
  brings the drafter's context of the cached prefix along (written when the prefix was computed).
- decode: the core's draft gate decides whether this step drafts at all; the core drafts a block per
  request from its last committed token (the anchor), all requests in one pass: `drafter.block_hidden`
  (one non-causal pass over [anchor, mask, ...]) and `sequential_draft` (the sequential head, greedy or
  sampled); the core's verify
  planner picks how many drafts k of each block to verify from the blocks' confidences (the step rate
  learned from the served steps, as in vLLM: `policy/engine_plan.make_planner`); the target verifies
  [anchor, d_1 .. d_k] of every request in one TARGET_VERIFY forward (SGLang's worker and KV pool: the
  scheduler reserved n slots per request, `eagle_prepare_for_decode`, of which the first k + 1 are
  written); the core's `verify_greedy` / `verify_rejection` accepts a prefix plus one token from the
  target, and the taps of the committed positions extend the drafter's context.
Drafter, heads, drafting, verification, planning and gate are the core's (dspark_plugin.model / decode /
policy); this file only moves tensors between them and SGLang.

Sampled requests (temperature / top-k / top-p) are drafted by the core's sampler and accepted by
its rejection sampling against the distribution SGLang's own sampler uses (`sglang_target_probs`).
A request with min-p, a logit bias, penalties, min_new_tokens, a grammar or a custom logit processor
(and every request under --enable-deterministic-inference) is decoded without drafts: its row of the
verify forward is the anchor alone (the logits a plain decode step computes) and SGLang's own sampler
draws its token there, with its penalties, bias, grammar mask and seed (`_plain_tokens`), so it gets
exactly what a server without speculation gives; the other requests of the batch are drafted as usual.
So are the rows of a step the gate closed, and a row whose draft failed.
Known limits of this version: no overlap scheduling (the worker is synchronous); no context lookup
(vLLM's copies from a request's own history); no logprobs on the speculative path.
"""
from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import torch
from torch import nn

logger = logging.getLogger("sglang.dspark_plugin.worker")


class _TargetHead(nn.Module):
    """The target's LM head as the core expects one: hidden [.., d] -> logits [.., V] (unquantized)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int):
        super().__init__()
        self.weight = weight
        self.vocab_size = vocab_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h.to(self.weight.dtype), self.weight)[..., : self.vocab_size]


class _TargetParts(nn.Module):
    """What `load_drafter(target=...)` reads of a target: its text config, input embedding and output head."""

    def __init__(self, config: Any, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config, self.embed_tokens, self.lm_head = config, embed_tokens, lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def sglang_target_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [.., V] -> the distribution SGLang's own sampler draws the next token from (pytorch sampling
    backend, `top_k_top_p_min_p_sampling_from_probs_torch`): softmax(logits / T), then, over the tokens
    sorted by probability, keep rank < top_k and those whose preceding mass (of the *unfiltered*
    probabilities) is <= top_p, renormalised. Rejection sampling against exactly this keeps the output
    distribution the plain server's (the core's `logits_to_probs` filters top-p after top-k, which
    differs when both are set)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    drop = (ranks >= top_k) | (before > top_p)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


class _StepTiming:
    """Where a decode step's time goes, logged every `every` steps: drafting and planning, the target pass
    with acceptance, the drafter's context."""

    def __init__(self, every: int = 256):
        self.every = every
        self.reset()

    def reset(self) -> None:
        self.steps = self.rows = self.tokens = 0
        self.draft_s = self.verify_s = self.accept_s = 0.0

    def add(self, rows: int, tokens: int, draft_s: float, verify_s: float, accept_s: float) -> None:
        self.steps += 1
        self.rows += rows
        self.tokens += tokens
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.accept_s += accept_s
        if self.steps == self.every:
            ms = 1000.0 / self.steps
            logger.info("PLUGIN_DSPARK: %d decode steps, %.2f requests each: draft %.1f ms, target pass and "
                        "acceptance %.1f ms, context %.1f ms per step; %.2f tokens per request-step", self.steps,
                        self.rows / self.steps,
                        self.draft_s * ms, self.verify_s * ms, self.accept_s * ms, self.tokens / max(self.rows, 1))
            self.reset()


def needs_plain_decoding(req: Any) -> str | None:
    """Why SGLang's own sampler must decode this request (it changes the target's distribution in ways the
    core's rejection sampling does not model), or None. (Per-request seeds reach SGLang's sampler only under
    --enable-deterministic-inference, which `_decode` serves without drafts as a whole.)"""
    p = req.sampling_params
    for reason, on in (("min_p", (p.min_p or 0.0) > 0.0), ("logit_bias", bool(p.logit_bias)),
                       ("penalties", (p.frequency_penalty or 0.0) != 0.0 or (p.presence_penalty or 0.0) != 0.0
                        or (p.repetition_penalty or 1.0) != 1.0),
                       ("min_new_tokens", (p.min_new_tokens or 0) > 0),
                       ("a grammar", getattr(req, "grammar", None) is not None),
                       ("a custom logit processor", getattr(req, "custom_logit_processor", None) is not None)):
        if on:
            return reason
    return None


class _TargetPass(NamedTuple):
    """One decode step's target pass over each request's [anchor, d_1 .. d_k], after acceptance."""
    tokens: torch.Tensor          # [bs, n] the accepted drafts + the target's token, per request
    accept_lens: torch.Tensor     # [bs] tokens committed per request
    taps: torch.Tensor            # [rows, taps] the drafter's taps of every row the pass took
    positions: torch.Tensor       # [rows] their positions
    slots: torch.Tensor           # [rows] their KV slots
    starts: list[int]             # where each request's rows start
    logits_output: Any

    def committed(self) -> torch.Tensor:
        """The rows of each request's anchor + accepted drafts: the positions the drafter's context gains."""
        return torch.cat([torch.arange(start, start + int(count))
                          for start, count in zip(self.starts, self.accept_lens)])


def _row(block: Any, n: int) -> Any:
    """Row n of a drafted block, as a block of one request."""
    from dspark_plugin.decode.draft import DraftBlock

    return DraftBlock(tokens=block.tokens[n:n + 1], probs=block.probs[n:n + 1] if block.probs is not None else None,
                      confidence=block.confidence[n:n + 1] if block.confidence is not None else None,
                      ok=block.ok[n:n + 1])


class DSparkPluginWorker:
    """Placeholder where SGLang is not installed; replaced below by the real worker, a subclass of
    SGLang's `BaseSpecWorker` built at import time (algorithm.py imports this module lazily, from a
    scheduler, so the core and the vLLM environment never need SGLang)."""


def _build_worker_class() -> type:
    from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

    class _Worker(BaseSpecWorker):
        def __init__(self, server_args: Any, gpu_id: int, nccl_port: int, target_worker: Any):
            super().__init__()
            from sglang.srt.runtime_context import get_device, get_spec

            from dspark_plugin.checkpoint.deepspec import load_drafter
            from dspark_plugin.policy.circuit_breaker import CircuitBreaker
            from dspark_plugin.policy.engine_plan import make_planner, settings_from_env

            self.server_args = server_args
            self._target_worker = target_worker
            self._draft_worker = None
            self.model_runner = target_worker.model_runner
            self.device = get_device().device
            self.num_draft_tokens = int(get_spec().speculative_num_draft_tokens)
            target = self.model_runner.model
            config = self.model_runner.model_config.hf_config
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            # The target's embedding and LM head, shared; a pruned drafter keeps its own draft-space LM head
            # (load_drafter takes it from the checkpoint) and drafts target ids through its d2t.
            parts = _TargetParts(text, target.model.embed_tokens,
                                 _TargetHead(target.lm_head.weight, int(text.vocab_size)))
            # load_drafter checks the drafter against the target's vocabulary, width and depth (one clear error).
            drafter = load_drafter(get_spec().speculative_draft_model_path, target=parts, dtype=torch.float32,
                                   device="cpu")
            if drafter.num_drafts + 1 != self.num_draft_tokens:
                raise ValueError(f"PLUGIN_DSPARK: --speculative-num-draft-tokens {self.num_draft_tokens} must be the "
                                 f"drafter's drafts per block + 1 = {drafter.num_drafts + 1}")
            self.drafter = drafter
            # The target returns the drafter's taps (decoder-layer outputs) as packed aux hidden states.
            target.set_dflash_layers_to_capture(list(drafter.cfg.target_layer_ids))
            self.context: Any = None   # SlotContext, sized when SGLang allocates the target's KV pool
            self.generator = torch.Generator().manual_seed(int(server_args.random_seed or 0))   # drafts, acceptance
            self._logged_plain: set[str] = set()
            self._timing = _StepTiming()
            self._failures: dict[str, int] = {}
            self.breaker = CircuitBreaker()   # a drafter failing step after step stops being asked, for a while
            self.vocab_size = int(text.vocab_size)
            # Verify planning and the draft gate: the core's, as the vLLM proposer uses them (DSPARK_SCHEDULER,
            # DSPARK_SPS, DSPARK_DRAFT_GATE, DSPARK_ONLINE_SPS; the curve learned online is saved under "sglang").
            self.planner = make_planner("sglang", str(self.model_runner.model_config.model_path),
                                        str(get_spec().speculative_draft_model_path),
                                        drafter.cfg.enable_confidence_head, "cpu", torch.float32, settings_from_env(),
                                        None, log=logger.info, warn=logger.warning)
            self._last_batch = self._last_step_tokens = self._last_rejected = 0
            logger.info("PLUGIN_DSPARK: drafter %s (%s head, %d drafts per block)",
                        get_spec().speculative_draft_model_path, drafter.cfg.markov_head_type, drafter.num_drafts)

        # -- what SGLang's scheduler asks of every speculative worker ------------------------------
        def alloc_memory_pool(self, **kwargs: Any) -> None:
            """Called by SGLang's scheduler after the target's pools exist: the drafter's context K/V gets one
            entry per slot of the target's KV pool."""
            from dspark_plugin.model.slot_context import SlotContext

            self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()
            kv_pool, cfg = self.model_runner.token_to_kv_pool, self.drafter.cfg
            slots = int(kv_pool.size) + int(getattr(kv_pool, "page_size", 1))
            self.context = SlotContext(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim,
                                       dtype=torch.float32)
            logger.info("PLUGIN_DSPARK: the drafter's context at the target's %d KV slots (%.1f MiB)", slots,
                        self.context.nbytes / 2**20)

        @property
        def draft_worker(self) -> None:
            return None   # no SGLang draft model runner: the core drafts

        def clear_cache_pool(self) -> None:
            pass   # the drafter's context lives at SGLang's slots: freed and reused with them

        # -- the drafter's context ----------------------------------------------------------------
        def _write_context(self, taps: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
            """Tapped target states [N, taps] of committed positions [N] (any requests) -> the drafter's
            context K/V at their KV slots [N]: one K/V projection for all of them (per token, no attention)."""
            if taps.shape[0] == 0:
                return
            with torch.no_grad():
                kv = self.drafter.context_kv(taps[None].float(), positions.to(torch.int64)[None])
            self.context.write(kv, slots)

        def _context_rows(self, batch: Any, rows: list[int], seq_lens: torch.Tensor) -> list[torch.Tensor]:
            """The slots of each listed request's committed positions 0 .. seq_len - 1, in order."""
            req_to_token = batch.req_to_token_pool.req_to_token
            pool = batch.req_pool_indices.tolist()
            return [req_to_token[pool[i], :int(seq_lens[i])] for i in rows]

        def _sampling_params(self, batch: Any) -> list[tuple[float, int, float]]:
            """(temperature, top_k, top_p) per request in the core's terms (temperature 0 = greedy; top_k 0 =
            all)."""
            info = batch.sampling_info
            out = []
            vocab = int(info.vocab_size)
            for t, k, p in zip(info.temperatures.view(-1).tolist(), info.top_ks.view(-1).tolist(),
                               info.top_ps.view(-1).tolist()):
                if k <= 1:   # SGLang's greedy: temperature 0 becomes top_k 1 (sampling_params.py)
                    out.append((0.0, 0, 1.0))
                else:
                    out.append((float(t), 0 if k >= vocab else int(k), float(p)))
            return out

        def _plain_tokens(self, logits: torch.Tensor, batch: Any, positions: torch.Tensor) -> torch.Tensor:
            """logits [bs, V] at each request's anchor -> the token SGLang's own sampler draws there for a
            plain decode step: penalties, logit bias and grammar mask applied (`_preprocess_logits`), then
            its sampler with the request's temperature / top-k / top-p / min-p / seed at the anchor's
            position (what a decode step passes for seeded sampling)."""
            from sglang.srt.layers.logits_processor import LogitsProcessorOutput

            bs = logits.shape[0]
            out = LogitsProcessorOutput(next_token_logits=logits.clone())
            self.model_runner._preprocess_logits(out, batch.sampling_info)
            return self.model_runner.sampler(out, batch.sampling_info, False, [0] * bs, [None] * bs,
                                             positions.to(self.device)).view(-1)

        # -- one scheduler step -------------------------------------------------------------------
        def forward_batch_generation(self, batch: Any, on_publish: Any = None, pp_proxy_tensors: Any = None,
                                     **kwargs: Any) -> Any:
            if batch.forward_mode.is_extend():
                return self._prefill(batch, on_publish)
            if batch.forward_mode.is_idle():
                raise RuntimeError("PLUGIN_DSPARK: idle batches (data-parallel attention) are not served")
            return self._decode(batch, on_publish)

        def _prefill(self, batch: Any, on_publish: Any) -> Any:
            from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
            from sglang.srt.speculative.ngram_info import NgramVerifyInput

            self.planner.discard_step()   # a prefill pass: not a decode step's cost
            result = self._target_worker.forward_batch_generation(batch, capture_hidden_mode=CaptureHiddenMode.FULL)
            taps = result.logits_output.hidden_states
            if taps is None:
                raise RuntimeError("PLUGIN_DSPARK: the target returned no tapped hidden states")
            # The prompt's (or chunk's) positions after any cached prefix, at the slots the target just wrote.
            positions = torch.cat([torch.arange(int(prefix), int(prefix) + int(n))
                                   for prefix, n in zip(batch.prefix_lens, batch.extend_lens)])
            self._write_context(taps[:positions.shape[0]], positions, batch.out_cache_loc[:positions.shape[0]])
            result.logits_output.hidden_states = None
            bs = len(batch.reqs)
            predict = result.next_token_ids
            new_seq_lens = batch.seq_lens.clone()
            accept_tokens = torch.zeros(bs, self.num_draft_tokens, dtype=torch.int32, device=self.device)
            accept_tokens[:, 0] = predict
            accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
            if on_publish is not None:
                on_publish(new_seq_lens)
            result.accept_lens = accept_lens
            result.new_seq_lens = new_seq_lens
            result.speculative_num_draft_tokens = self.num_draft_tokens
            result.next_draft_input = NgramVerifyInput(draft_token_num=self.num_draft_tokens, new_seq_lens=new_seq_lens,
                                                       accept_tokens=accept_tokens.flatten(), accept_lens=accept_lens)
            return result

        # -- drafting and planning ------------------------------------------------------------------
        def _draft(self, batch: Any, anchors: torch.Tensor, seq_lens: torch.Tensor,
                   params: list[tuple[float, int, float]], plain: list[str | None], t0: float) -> list[Any]:
            """Each request's drafted block, or None where this step verifies nothing for it: SGLang's sampler
            decodes it (`plain`), the draft gate closed the step, or its draft failed or is not finite (one
            log line per kind of failure; a failing drafter costs speed, never the request)."""
            from dspark_plugin.decode.draft import sequential_draft

            bs, planner = len(batch.reqs), self.planner
            try:   # the gate's bookkeeping costs speed at worst, never the request
                planner.begin_step(self._last_batch, self._last_step_tokens, t0)
                draft = not all(plain) and planner.should_draft(bs, t0, self._last_rejected,
                                                                step_tokens=self._last_step_tokens)
            except Exception:  # noqa: BLE001
                self._failed("the draft gate failed; drafting this step")
                draft = True
            if not draft:
                return [None] * bs
            if not self.breaker.allows():   # paused after failures in a row: the gate did not choose this skip
                planner.draft_unmeasured()
                return [None] * bs
            rows = [i for i in range(bs) if not plain[i]]
            blocks: list[Any] = [None] * bs
            try:
                with torch.no_grad():
                    # One block forward for all drafted requests, over their contexts gathered from the slots.
                    context = self.context.gather(self._context_rows(batch, rows, seq_lens))
                    h = self.drafter.block_hidden(context, anchors[rows], seq_lens[rows].cpu())
                    # The sequential head per group of requests sampled alike (greedy; each top-k / top-p).
                    groups: dict[tuple[bool, int, float], list[int]] = {}
                    for j, i in enumerate(rows):
                        temperature, top_k, top_p = params[i]
                        groups.setdefault((temperature <= 0, top_k, top_p), []).append(j)
                    for (greedy, top_k, top_p), members in groups.items():
                        at = torch.tensor(members)
                        temperature = 0.0 if greedy else torch.tensor([params[rows[j]][0] for j in members])
                        block = sequential_draft(self.drafter, h[at], anchors[rows][at], temperature, top_k, top_p,
                                                 self.generator)
                        for n, j in enumerate(members):
                            one = _row(block, n)
                            ok = bool(one.ok.all()) and 0 <= int(one.tokens.min()) and \
                                int(one.tokens.max()) < self.vocab_size
                            if not ok:
                                self._failed("a draft was not finite or left the vocabulary; that request decodes "
                                             "without drafts this step", traceback=False)
                            blocks[rows[j]] = one if ok else None
            except Exception:  # noqa: BLE001
                self._failed("drafting failed; decoding this step without drafts")
                self._breaker_failed()
                return [None] * bs
            if any(b is not None for b in blocks):
                self.breaker.succeeded()
            elif not all(plain):
                self._breaker_failed()
            return blocks

        def _breaker_failed(self) -> None:
            pause = self.breaker.failed()
            if pause is not None:
                logger.warning("PLUGIN_DSPARK: %s", self.breaker.opened_line(pause))

        def _plan(self, blocks: list[Any], g: int, t0: float, t1: float) -> list[int]:
            """Drafts to verify per request (0 where there is no block): the core's verify planner on the
            blocks' confidences (the full block when it is off or the drafter has none)."""
            planner, bs = self.planner, len(blocks)
            try:
                if all(b is None for b in blocks):
                    planner.skip(bs, g, seconds=t1 - t0)
                    return [0] * bs
                if planner.mode == "fixed" or any(b is not None and b.confidence is None for b in blocks):
                    planner.record([g] * bs, g)
                    return [g if b is not None else 0 for b in blocks]
                confidence = torch.stack([b.confidence[0, :g].float() if b is not None else torch.zeros(g)
                                          for b in blocks])                      # [bs, g]; 0: nothing to verify
                lengths = planner.plan(confidence)
                planner.observe_draft_time(t1 - t0)
                return [length if b is not None else 0 for b, length in zip(blocks, lengths)]
            except Exception:  # noqa: BLE001 - a planner bug must cost speed, not the request
                self._failed("verify planning failed; verifying the full block")
                return [g if b is not None else 0 for b in blocks]
            finally:
                planner.end_step(time.perf_counter())

        def _failed(self, what: str, traceback: bool = True) -> None:
            """One log line per kind of failure (then every 100th), never an exception into SGLang's scheduler."""
            self._failures[what] = self._failures.get(what, 0) + 1
            count = self._failures[what]
            if count == 1 or count % 100 == 0:
                (logger.exception if traceback else logger.warning)("PLUGIN_DSPARK: %s (%d times)", what, count)

        def _verify(self, batch: Any, anchors: torch.Tensor, seq_lens: torch.Tensor, blocks: list[Any],
                    lengths: list[int], params: list[tuple[float, int, float]]) -> _TargetPass:
            """[anchor, d_1 .. d_k] of every request through the target in one TARGET_VERIFY pass over the first
            k + 1 slots the scheduler reserved, then the core's acceptance."""
            from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
            from sglang.srt.speculative.ngram_info import NgramVerifyInput

            from dspark_plugin.decode.verify import verify_greedy, verify_rejection

            bs, n = len(batch.reqs), self.num_draft_tokens
            verify = [torch.cat([anchors[i:i + 1], blocks[i].tokens[0, :k]]) if k else anchors[i:i + 1]
                      for i, k in enumerate(lengths)]                           # [anchor, d_1 .. d_k] per request
            sizes = [k + 1 for k in lengths]
            starts = [0]
            for size in sizes[:-1]:
                starts.append(starts[-1] + size)
            verify_ids = torch.cat(verify)                                       # [sum(k + 1)]
            positions = torch.cat([seq_lens[i] + torch.arange(size) for i, size in enumerate(sizes)])

            # 2) Verify in one target forward over the slots the scheduler reserved (the first k + 1 of its n).
            req_to_token = batch.req_to_token_pool.req_to_token
            pool_rows = torch.cat([batch.req_pool_indices[i:i + 1].to(torch.int64).expand(size)
                                   for i, size in enumerate(sizes)])
            out_cache_loc = req_to_token[pool_rows, positions].to(torch.int64)
            saved = (batch.forward_mode, batch.input_ids, batch.out_cache_loc, batch.spec_info, batch.seq_lens,
                     batch.seq_lens_cpu, batch.seq_lens_sum)
            spec = NgramVerifyInput(draft_token=verify_ids, positions=positions, draft_token_num=n,
                                    new_seq_lens=seq_lens)
            spec.capture_hidden_mode = CaptureHiddenMode.FULL
            batch.forward_mode = ForwardMode.TARGET_VERIFY
            batch.input_ids = verify_ids.to(self.device)
            batch.out_cache_loc = out_cache_loc
            batch.spec_info = spec
            try:
                fb = ForwardBatch.init_new(batch, self.model_runner, capture_hidden_mode=CaptureHiddenMode.FULL,
                                           return_hidden_states_before_norm=False)
                # torch_native reads K/V through req_to_token[:seq_len] with the verify tokens as an extend
                # after the committed prefix: it needs the extend view, which TARGET_VERIFY leaves unset.
                size_t = torch.tensor(sizes, dtype=torch.int64)
                fb.positions = positions
                fb.seq_lens = seq_lens + size_t
                fb.seq_lens_cpu = fb.seq_lens.cpu()
                fb.seq_lens_sum = int(fb.seq_lens_cpu.sum())
                fb.extend_prefix_lens = seq_lens.to(torch.int32)
                fb.extend_seq_lens = size_t.to(torch.int32)
                fb.extend_prefix_lens_cpu = seq_lens.tolist()
                fb.extend_seq_lens_cpu = sizes
                fb.extend_num_tokens = sum(sizes)
                fb.extend_start_loc = torch.tensor(starts, dtype=torch.int32)
                out = self._target_worker.forward_batch_generation(batch=None, forward_batch=fb, is_verify=True)
            finally:
                (batch.forward_mode, batch.input_ids, batch.out_cache_loc, batch.spec_info, batch.seq_lens,
                 batch.seq_lens_cpu, batch.seq_lens_sum) = saved
            flat_logits = out.logits_output.next_token_logits                     # [sum(k + 1), V]
            taps = out.logits_output.hidden_states                               # [sum(k + 1), taps]
            out.logits_output.hidden_states = None

            # 3) Accept (the core's verification: greedy, or rejection sampling against SGLang's target
            # distribution for the request's temperature / top-k / top-p; SGLang's own sampler where nothing
            # was drafted) and extend the drafter's context.
            first = torch.tensor(starts)
            sampled = (self._plain_tokens(flat_logits[first], batch, seq_lens).cpu()
                       if any(b is None for b in blocks) else None)
            tokens = torch.zeros(bs, n, dtype=torch.int64)
            accept_lens = torch.ones(bs, dtype=torch.int32)
            for i, block in enumerate(blocks):
                if block is None:
                    tokens[i, 0] = sampled[i]
                    continue
                k, temperature, (_, top_k, top_p) = lengths[i], params[i][0], params[i]
                logits = torch.zeros(1, n, flat_logits.shape[-1])
                logits[0, :k + 1] = flat_logits[starts[i]:starts[i] + k + 1].float()
                if temperature <= 0:
                    row = verify_greedy(block.tokens, logits, torch.tensor([k]))
                else:
                    target_probs = sglang_target_probs(logits, temperature, top_k or logits.shape[-1], top_p)
                    row = verify_rejection(block.tokens, block.probs, target_probs, torch.tensor([k]), self.generator)
                kept = int(row.num_accepted[0]) + 1
                tokens[i, :kept] = row.tokens[0, :kept]
                accept_lens[i] = kept
            return _TargetPass(tokens, accept_lens, taps, positions, out_cache_loc, starts, out.logits_output)

        def _decode_without_drafts(self, batch: Any, anchors: torch.Tensor, seq_lens: torch.Tensor) -> _TargetPass:
            """A step that verifies no drafts (the gate closed it, or every row is SGLang's sampler's) runs
            SGLang's own DECODE pass over the first reserved slot and its sampler: what a plain server's step
            computes (a one-token TARGET_VERIFY costs ~15% more on CPU, BENCHMARKS.md "SGLang serving"), with
            the taps of the anchor for the drafter's context. Same return as `_verify`."""
            from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode

            bs, n = len(batch.reqs), self.num_draft_tokens
            pool = batch.req_pool_indices.to(torch.int64)
            saved = (batch.forward_mode, batch.input_ids, batch.out_cache_loc, batch.spec_info, batch.seq_lens,
                     batch.seq_lens_cpu, batch.seq_lens_sum)
            batch.forward_mode = ForwardMode.DECODE
            batch.input_ids = anchors.to(self.device)
            slots = batch.req_to_token_pool.req_to_token[pool, seq_lens].to(torch.int64)
            batch.out_cache_loc = slots
            batch.seq_lens = (seq_lens + 1).to(saved[4].dtype)   # a decode batch counts its input token
            batch.seq_lens_cpu = batch.seq_lens.cpu()
            batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
            batch.spec_info = None
            try:
                out = self._target_worker.forward_batch_generation(batch, capture_hidden_mode=CaptureHiddenMode.FULL)
            finally:
                (batch.forward_mode, batch.input_ids, batch.out_cache_loc, batch.spec_info, batch.seq_lens,
                 batch.seq_lens_cpu, batch.seq_lens_sum) = saved
            taps = out.logits_output.hidden_states                               # [bs, taps]
            out.logits_output.hidden_states = None
            tokens = torch.zeros(bs, n, dtype=torch.int64)
            tokens[:, 0] = out.next_token_ids.view(-1).to(torch.int64).cpu()
            return _TargetPass(tokens, torch.ones(bs, dtype=torch.int32), taps, seq_lens, slots, list(range(bs)),
                               out.logits_output)

        # -- one decode step ------------------------------------------------------------------------
        def _decode(self, batch: Any, on_publish: Any) -> Any:
            from sglang.srt.managers.utils import GenerationBatchResult
            from sglang.srt.speculative.ngram_info import NgramVerifyInput

            t0 = time.perf_counter()
            params = self._sampling_params(batch)
            bs, n = len(batch.reqs), self.num_draft_tokens
            g = n - 1
            seq_lens = batch.seq_lens.to(torch.int64)
            anchors = torch.tensor([req.output_ids[-1] for req in batch.reqs], dtype=torch.int64)

            # Requests SGLang's own sampler must decode (penalties, grammar, ...) are verified without drafts.
            deterministic = batch.sampling_info.sampling_seed is not None   # SGLang's seeded per-position draws
            plain = [("deterministic inference" if deterministic else needs_plain_decoding(req)) for req in batch.reqs]
            for reason in {r for r in plain if r and r not in self._logged_plain}:
                self._logged_plain.add(reason)
                logger.info("PLUGIN_DSPARK: requests with %s are decoded without drafts (SGLang's sampler)", reason)

            # 1) Draft (unless the draft gate closes the step), then plan how many drafts each request verifies.
            blocks = self._draft(batch, anchors, seq_lens, params, plain, t0)
            t1 = time.perf_counter()
            lengths = self._plan(blocks, g, t0, t1)
            if any(lengths):   # 2-3) verify the planned prefixes in one pass, accept
                target = self._verify(batch, anchors, seq_lens, blocks, lengths, params)
            else:               # nothing to verify: SGLang's own decode step and sampler
                target = self._decode_without_drafts(batch, anchors, seq_lens)
            t2 = time.perf_counter()
            accept_lens, logits_output = target.accept_lens, target.logits_output
            accept_tokens = target.tokens.to(torch.int32)
            kept = target.committed()
            self._write_context(target.taps[kept], target.positions[kept], target.slots[kept])
            self._last_batch, self._last_step_tokens = bs, bs + sum(lengths)   # tokens the target pass took
            self._last_rejected = sum(lengths) - int(accept_lens.sum()) + bs
            new_seq_lens = (seq_lens + accept_lens).to(batch.seq_lens.dtype)
            self._timing.add(bs, int(accept_lens.sum()), t1 - t0, t2 - t1, time.perf_counter() - t2)
            if on_publish is not None:
                on_publish(new_seq_lens)
            next_draft_input = NgramVerifyInput(draft_token_num=n, new_seq_lens=new_seq_lens,
                                                accept_tokens=accept_tokens.flatten(), accept_lens=accept_lens)
            return GenerationBatchResult(logits_output=logits_output, next_token_ids=accept_tokens.flatten(),
                                         can_run_cuda_graph=False, accept_lens=accept_lens, new_seq_lens=new_seq_lens,
                                         next_draft_input=next_draft_input, speculative_num_draft_tokens=n)

    _Worker.__name__ = _Worker.__qualname__ = "DSparkPluginWorker"
    return _Worker


try:   # only where SGLang is installed; algorithm.py imports this module lazily, from a scheduler
    DSparkPluginWorker = _build_worker_class()  # type: ignore[misc]  # noqa: F811
except ImportError:   # pragma: no cover - documentation builds without SGLang
    pass
