"""policy/circuit_breaker.py: a drafter that always fails is asked rarely; one that fails now and
then is always asked; a working draft closes the breaker."""
from __future__ import annotations

import random

import pytest

from dspark_plugin.policy.circuit_breaker import CircuitBreaker


def attempts(breaker: CircuitBreaker, steps: int, fails) -> int:
    """Steps that drafted (were allowed) out of `steps`; fails(i) says whether attempt i fails."""
    tried = 0
    for _ in range(steps):
        if not breaker.allows():
            continue
        tried += 1
        if fails(tried):
            breaker.failed()
        else:
            breaker.succeeded()
    return tried


def test_a_drafter_that_always_fails_is_tried_on_few_steps():
    breaker = CircuitBreaker(threshold=8, first_pause=64, max_pause=4096)
    tried = attempts(breaker, 20_000, lambda i: True)
    # 8 failures open it, then one retry after each pause: 64, 128, ..., 4096, 4096, ...
    assert tried < 30, tried
    assert breaker.pause == 4096 and breaker.times_opened == tried - 7


def test_random_faults_do_not_open_it():
    rng = random.Random(0)
    breaker = CircuitBreaker()
    assert attempts(breaker, 5_000, lambda i: rng.random() < 0.3) == 5_000
    assert breaker.times_opened == 0


def test_a_working_draft_after_a_pause_closes_it_and_resets_the_pause():
    breaker = CircuitBreaker(threshold=2, first_pause=4, max_pause=16)
    assert breaker.failed() is None and breaker.failed() == 4
    assert [breaker.allows() for _ in range(5)] == [False] * 4 + [True]
    assert breaker.failed() == 8              # the retry failed: paused again, twice as long
    assert [breaker.allows() for _ in range(9)] == [False] * 8 + [True]
    breaker.succeeded()
    assert breaker.failed() is None and breaker.failed() == 4   # back to the first pause, two in a row again


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="circuit breaker"):
        CircuitBreaker(first_pause=64, max_pause=8)
