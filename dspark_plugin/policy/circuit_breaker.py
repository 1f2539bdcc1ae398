"""A drafter that fails on every step stops being asked, and is asked again later.

Each failed draft step (an exception, a non-finite block, token ids outside the vocabulary) already
decodes that step without drafts (lossless, docs/algorithm.md §1.7), but it still pays for the
drafter's forward. A drafter broken for good (a bad checkpoint that loaded, a kernel that fails on
this machine) would make every step slower than no speculation. After `threshold` failed draft steps
in a row the breaker opens: the next `pause` steps that would draft do not (they take the plain path,
their context kept as on any undrafted step), then one step tries again. A failed retry doubles the
pause, up to `max_pause`; a successful draft step closes the breaker and resets the pause. Random
faults do not trip it: at a 30% failure rate, 8 in a row happen once in ~15,000 steps.

Engine-free: the vLLM proposer and the SGLang worker each hold one and call `allows` / `failed` /
`succeeded`; under tensor parallelism the vLLM proposer broadcasts rank 0's decision with the gate's.
"""
from __future__ import annotations


class CircuitBreaker:
    def __init__(self, threshold: int = 8, first_pause: int = 64, max_pause: int = 4096) -> None:
        if threshold < 1 or first_pause < 1 or max_pause < first_pause:
            raise ValueError(f"circuit breaker: threshold {threshold}, pauses {first_pause}..{max_pause}")
        self.threshold, self.first_pause, self.max_pause = threshold, first_pause, max_pause
        self.failed_in_a_row = 0
        self.pause = first_pause          # the next pause's length, in steps that would draft
        self.paused_left = 0
        self.times_opened = 0

    def allows(self) -> bool:
        """Called once per step that wants to draft: False while paused (the step counts down)."""
        if self.paused_left > 0:
            self.paused_left -= 1
            return False
        return True

    def failed(self) -> int | None:
        """A draft step failed; the pause in steps if the breaker opens now, else None."""
        self.failed_in_a_row += 1
        if self.failed_in_a_row < self.threshold:
            return None
        pause = self.pause
        self.paused_left = pause
        self.pause = min(2 * pause, self.max_pause)
        self.failed_in_a_row = self.threshold - 1   # one more failure (the retry) opens it again
        self.times_opened += 1
        return pause

    def opened_line(self, pause: int) -> str:
        """The log line for a pause `failed` just returned (each adapter prefixes its own name)."""
        return (f"{self.threshold} draft steps in a row failed; no drafting for the next {pause} steps that would "
                f"draft, then one try (circuit breaker, opened {self.times_opened} times)")

    def succeeded(self) -> None:
        self.failed_in_a_row = 0
        self.pause = self.first_pause
