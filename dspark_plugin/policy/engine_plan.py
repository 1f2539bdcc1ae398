"""Per-request verify lengths for the engine adapters: the engine side of docs/algorithm.md §1.5.

Engine-free (no vLLM or SGLang import) so it is unit-tested without an engine; the vLLM proposer and
the SGLang worker build theirs with `make_planner`. The adapter drafts the full block for every
request, then asks `VerifyPlanner.plan` how long a prefix of each block the engine should verify; the choice itself is `dspark_plugin.policy.verify_planner` (the same code the reference
runner uses), this module only supplies the engine's step cost and keeps statistics.

Switches (read once, when the engine starts):
- `DSPARK_SCHEDULER` = `early_stop` (Algorithm 1, lossless; the default), `async` (budget from
  survivals two steps old, top-K of the fresh ones) or `fixed` (scheduler off: always the full block).
- `DSPARK_SPS` = an SPS JSON file (`dspark profile --engine vllm --out FILE`). Without it the
  curve is looked up in `<drafter dir>/dspark_sps.json`, then in the default cache
  (`step_rate.find_sps_curve`); a profiled curve found there is used as it is.
- `DSPARK_ONLINE_SPS` = `on` (default) or `off`: with no profiled curve, learn it from the served
  steps (`policy/online_step_rate.py`, saved in the user cache for the next start); `off` then
  means the full block every step.
- `DSPARK_DRAFT_GATE` = `on` (default with the scheduler) or `off`: skip the whole draft of a step
  when, at this batch size, drafting has been earning fewer tokens/s than not drafting
  (`dspark_plugin.policy.draft_gate`). Never used with `fixed` (the full block every step).
- `DSPARK_DEFER_CONTEXT` = `on` (default) or `off`: a step the gate skips keeps its context and
  the next draft writes it (`vllm/deferred_context.py`); `off` writes it in the step.

Step cost. The profiled curve is the *target's* decode step time at B verified tokens; a DSpark
step also runs the drafter, whose cost depends on the number of requests, not on B. Leaving it out
would overstate how much a longer verify costs relative to the whole step, so the planner adds the
drafter's measured time per step (a running mean over *earlier* steps, never the step being
planned: the plan for a block must not depend on anything measured after its tokens were drawn).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from dspark_plugin import envs
from dspark_plugin.errors import DSparkError
from dspark_plugin.policy.draft_gate import DraftGate
from dspark_plugin.policy.online_step_rate import LearnedCurve, OnlineStepRate, cache_key, default_path
from dspark_plugin.policy.step_rate import SPSCurve, find_sps_curve
from dspark_plugin.policy.verify_planner import AsyncScheduler, prefix_survival, schedule_verify_lengths

MODES = envs.VARS[envs.SCHEDULER].choices  # early_stop, async, fixed
DRAFT_COST_DECAY = 0.9  # running mean of the drafter's step time: recent steps weigh more


@dataclass(frozen=True)
class SchedulerSettings:
    mode: str | None       # None: not chosen (early_stop when a curve is found, else fixed)
    sps_path: str | None   # explicit SPS file, or None to look in the drafter dir / cache
    draft_gate: bool = True
    defer_context: bool = True  # a skipped step's context K/V waits for the next draft
    online_sps: bool = True     # no profiled curve: learn it from the served steps
    plan_seeded: bool = False   # seeded sampled requests planned too (else: the full block, always drafted)
    context_lookup: bool = True  # per request, a copy from its own history where it should survive longer


def settings_from_env(env: Mapping[str, str] | None = None) -> SchedulerSettings:
    """Read DSPARK_SCHEDULER / DSPARK_SPS / DSPARK_DRAFT_GATE / DSPARK_DEFER_CONTEXT / DSPARK_ONLINE_SPS /
    DSPARK_PLAN_SEEDED / DSPARK_CONTEXT_LOOKUP; a bad value is one error naming the variable (declared and
    parsed in `dspark_plugin.envs`)."""
    return SchedulerSettings(envs.read(envs.SCHEDULER, env), envs.read(envs.SPS, env),
                             envs.read(envs.DRAFT_GATE, env), envs.read(envs.DEFER_CONTEXT, env),
                             envs.read(envs.ONLINE_SPS, env), envs.read(envs.PLAN_SEEDED, env),
                             envs.read(envs.CONTEXT_LOOKUP, env))


def resolve_mode(requested: str | None, curve: SPSCurve | None, has_confidence: bool,
                 online: bool = False) -> tuple[str, str | None]:
    """(mode to run, why it differs from the request or None). Never fails: at worst `fixed`.
    online: the curve may be learned from the served steps when none was profiled."""
    if requested == "fixed":
        return "fixed", None
    if not has_confidence:
        return "fixed", "the drafter has no confidence head, so there is nothing to schedule on"
    if curve is None and not online:
        return "fixed", ("no SPS curve found and DSPARK_ONLINE_SPS=off, so the full block is verified; profile "
                         "one with `dspark profile --engine vllm --target TARGET --out DRAFTER/dspark_sps.json`")
    return requested or "early_stop", None


def make_planner(engine: str, target: str, drafter: str, has_confidence: bool, device: Any, dtype: Any,
                 settings: SchedulerSettings, max_batch_tokens: int | None, log: Callable[[str], None],
                 warn: Callable[[str], None], log_every: int = 256, fixed_because: str | None = None) -> VerifyPlanner:
    """The verify-length policy of an engine adapter, chosen once at start-up: a profiled curve if one is
    found (`DSPARK_SPS`, the drafter dir, the cache), else the curve learned online (saved per engine /
    target / drafter / machine / dtype), else the full block; the draft gate beside it. One log line
    says which. fixed_because: the engine cannot take per-request lengths (vLLM's async scheduling)."""
    curve = None
    if settings.mode != "fixed" and has_confidence:
        curve = find_sps_curve(target, drafter, path=settings.sps_path, device=device, dtype=dtype, engine=engine)
    mode, why = resolve_mode(settings.mode, curve, has_confidence, online=settings.online_sps)
    if mode != "fixed" and fixed_because is not None:
        mode, why = "fixed", fixed_because
    online = None
    if mode == "fixed":
        log(f"dspark-plugin scheduler: fixed (requested {settings.mode or 'default'}): verifying the full block"
            + (f"; {why}" if why else ""))
    elif curve is not None:
        log(f"dspark-plugin scheduler: mode {mode}, profiled SPS curve over B = {curve.batch_sizes[0]}.."
            f"{curve.batch_sizes[-1]} ({curve.meta.get('key', 'no key')})")
    else:
        online = OnlineStepRate(path=default_path(), key=cache_key(engine, target, drafter, device, dtype), warn=warn)
        online.load()
        log(f"dspark-plugin scheduler: mode {mode}, SPS curve learned online ("
            + (f"loaded {online.path}: {online.loaded_steps} steps measured before" if online.loaded_steps
               else f"new; saved to {online.path}") + ")")
    gate = DraftGate() if settings.draft_gate and mode != "fixed" else None
    if mode != "fixed":
        log(f"dspark-plugin draft gate: {'on' if gate else 'off (DSPARK_DRAFT_GATE=off)'}")
    return VerifyPlanner(mode, curve if mode != "fixed" else None, max_batch_tokens=max_batch_tokens, log=log,
                         log_every=log_every, gate=gate, online=online)


class StepCost:
    """SPS(B) of a whole DSpark step: 1 / (target step time at B + drafter time per step).

    Offers `table(lo, hi)` like `SPSCurve`, so the scheduler evaluates it vectorised.
    """

    def __init__(self, curve: SPSCurve | LearnedCurve, draft_s: float = 0.0):
        self.curve, self.draft_s = curve, max(0.0, float(draft_s))

    def table(self, lo: int, hi: int) -> torch.Tensor:
        return 1.0 / (1.0 / self.curve.table(lo, hi) + self.draft_s)

    def __call__(self, b: int) -> float:
        return float(self.table(int(b), int(b))[0])


class VerifyPlanner:
    """Verify lengths per step plus the statistics the proposer logs (mean verified length)."""

    def __init__(self, mode: str, curve: SPSCurve | None, max_batch_tokens: int | None = None,
                 log: Callable[[str], None] | None = None, log_every: int = 256, gate: DraftGate | None = None,
                 online: OnlineStepRate | None = None):
        if mode not in MODES:
            raise DSparkError(f"scheduler: unknown mode {mode!r}; expected one of {MODES}")
        if mode != "fixed" and curve is None and online is None:
            raise DSparkError(f"scheduler: mode {mode!r} needs an SPS curve, profiled or learned online")
        self.mode, self.curve, self.max_batch_tokens = mode, curve, max_batch_tokens
        self.online = online if mode != "fixed" and curve is None else None
        self._log, self.log_every = log, log_every
        self._draft_s: float | None = None
        self._async = AsyncScheduler(None, max_batch_tokens=max_batch_tokens) if mode == "async" else None
        self.gate = gate if mode != "fixed" else None
        if self.online is not None and self.gate is not None:
            self._attach_gate(self.online, self.gate)
        self._told_skip = False
        self._verified_last = 0   # drafts handed to vLLM by the last step
        self._step_end: float | None = None  # when the last proposal was handed to the engine
        self.steps = 0
        self.skipped_steps = 0
        self.skipped_s = 0.0
        self.request_steps = 0
        self.verified = 0
        self.gamma = 0

    def _attach_gate(self, online: OnlineStepRate, gate: DraftGate) -> None:
        """Save the gate's pairs with the learned curve; start from the saved ones, if any (a bad
        entry is one warning, never a failed start-up)."""
        online.gate = gate
        if online.loaded_gate is None:
            return
        try:
            gate.load_dict(online.loaded_gate, f"{online.path}[{online.key}]")
            if self._log is not None:
                self._log(f"dspark-plugin draft gate: loaded the last run's pairs ({gate.summary()})")
        except ValueError as e:
            online.warn(f"dspark-plugin draft gate: ignoring the saved pairs ({e}); measuring again")

    def begin_step(self, batch: int, step_tokens: int, now: float) -> None:
        """A proposal starts: the target step that ran since the last one processed `step_tokens`
        tokens for `batch` requests. Measured for the learned curve (not when a prefill shared the
        pass: its cost is the prompt's)."""
        if self.online is not None and self._step_end is not None and step_tokens <= batch + self._verified_last:
            self.online.observe(batch, step_tokens, now - self._step_end)
        self._step_end = None

    def discard_step(self) -> None:
        """A pass that is not a decode step (a prefill) runs before the next proposal: not measured."""
        self._step_end = None

    def end_step(self, now: float) -> None:
        """The proposal was handed to the engine; the next target step starts."""
        self._step_end = now

    def observe_draft_time(self, seconds: float) -> None:
        """Drafter time of a finished step; used from the next plan on."""
        if self._draft_s is None:
            self._draft_s = seconds
        else:
            self._draft_s = DRAFT_COST_DECAY * self._draft_s + (1 - DRAFT_COST_DECAY) * seconds

    def should_draft(self, batch: int, now: float, rejected: int | None = None,
                     step_tokens: int | None = None) -> bool:
        """Whether this step drafts at all (always, unless the draft gate is on and says no).

        rejected: drafts the target rejected in the step that just ran (vLLM's
        `num_rejected_tokens_gpu`, summed), so the gate counts accepted drafts, not expected ones.
        step_tokens: tokens the target processed in that step (a prefill among them: not measured).
        """
        if self.gate is None:
            return True
        accepted = None if rejected is None else max(0, self._verified_last - int(rejected))
        return self.gate.decide(batch, now, accepted, step_tokens)

    def draft_unmeasured(self) -> None:
        """This step drafts whatever the gate would say (a seeded request is in the batch); the
        gate measures neither it nor the step before it."""
        if self.gate is not None:
            self.gate.reset()

    def skip(self, batch: int, gamma: int, seconds: float | None = None) -> None:
        """A step that verifies no drafts (gate closed, or the draft failed); `seconds`: what the
        proposer spent on it (the plugin's own cost of a step the gate skipped)."""
        if seconds is not None:
            self.skipped_steps += 1
            self.skipped_s += seconds
        if self.gate is not None:
            self.gate.emitted(batch, verified=0)
            if self.gate.skipped == 1 and self._log is not None and not self._told_skip:
                self._told_skip = True  # once: the proof in a log that the gate acts
                self._log(f"dspark-plugin draft gate: first step without a draft (batch of {batch})")
        self.record([0] * batch, gamma)

    def plan(self, confidence: torch.Tensor, full_rows: list[bool] | None = None) -> list[int]:
        """Verify length per request (0..gamma) from this block's confidences c [R, gamma].
        full_rows: requests that verify the full block whatever the plan (seeded sampled ones)."""
        R, g = confidence.shape
        curve = self.curve if self.online is None else self.online.curve(R)
        if self.mode == "fixed":
            lengths = [g] * R
        else:
            survival = prefix_survival(confidence.detach().to("cpu", torch.float64))
            sps = StepCost(curve, self._draft_s or 0.0) if curve is not None else None
            explore = self.online.explore(R, g) if self.online is not None else 0
            if explore:
                # Measure a longer step's cost: decided by the step count alone (lossless).
                longest = g if self.max_batch_tokens is None else max(0, (self.max_batch_tokens - R) // R)
                lengths = [min(explore, longest)] * R
            elif sps is None:
                lengths = [0] * R  # nothing measured at this load yet
            elif self._async is not None:
                self._async.sps = sps
                lengths = self._async.schedule(survival).tolist()
            else:
                lengths = schedule_verify_lengths(survival, sps, "early_stop",
                                                  max_batch_tokens=self.max_batch_tokens).tolist()
            if full_rows is not None:
                lengths = [g if full else length for full, length in zip(full_rows, lengths)]
            if self.gate is not None and explore:
                # Not what drafting costs once the curve is known: the gate compares the plans.
                self.gate.reset()
            elif self.gate is not None:  # expected tokens: one per request + the verified survivals
                keep = torch.arange(g)[None, :] < torch.tensor(lengths)[:, None]
                self.gate.emitted(R + float(survival[keep].sum()), verified=sum(lengths))
        self.record(lengths, g)
        return lengths

    def record(self, lengths: list[int], gamma: int) -> None:
        self._verified_last = sum(lengths)
        self.steps += 1
        self.request_steps += len(lengths)
        self.verified += sum(lengths)
        self.gamma = gamma
        if self._log is not None and self.steps % self.log_every == 0:
            self._log(self.summary())

    @property
    def mean_verified(self) -> float:
        return self.verified / self.request_steps if self.request_steps else 0.0

    def summary(self) -> str:
        return (f"dspark-plugin scheduler: mode {self.mode}, {self.steps} steps, mean verified "
                f"length {self.mean_verified:.2f} of {self.gamma} per request, mean batch "
                f"{self.request_steps / max(1, self.steps):.1f} requests"
                + (f"; {self.gate.summary()}" if self.gate is not None else "")
                + (f"; proposer {1000 * self.skipped_s / self.skipped_steps:.2f} ms per step without a draft"
                   if self.skipped_steps else "")
                + (f"; {self.online.summary()}" if self.online is not None else ""))
