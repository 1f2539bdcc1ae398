"""Drafter faults on purpose, for tests of what a serving process does when its drafter misbehaves
mid-run (issue #21): `DSPARK_FAULT_INJECTION=raise:0.1,nan:0.1,out_of_range:0.1,stall:0.1`.

Off unless that variable is set (a server logs a warning when it is). Each draft step gets at most
one fault, spread evenly and deterministically (every kind accumulates its fraction per step and
fires when it reaches 1, starting with the first steps), so each kind occurs in exactly its share of
draft steps, already in a short run, and at fractions summing to 1 every draft step fails:
- `raise`: the draft step raises (as a drafter bug would);
- `nan`: the backbone's output is NaN (as an overflow would), caught by the sequential head's
  finiteness check;
- `out_of_range`: the first draft of every request is a token id past the target's vocabulary (as a
  wrong `d2t` map would), caught by the proposer's range check;
- `stall`: the step sleeps `STALL_S` before drafting (as a drafter starved of CPU would).
Each of the first three must end in that step proposing no drafts (plain decoding, output
unchanged); a stall only costs time, which the draft gate sees.
"""
from __future__ import annotations

import time

import torch

from dspark_plugin import envs

STALL_S = 0.2


class InjectedFault(RuntimeError):
    """What the `raise` fault raises."""


class FaultInjector:
    def __init__(self, faults: tuple[tuple[str, float], ...]):
        self.faults = faults
        self._due = [1.0 - fraction for _, fraction in faults]  # every kind fires on the first steps
        self.counts = {kind: 0 for kind, _ in faults}

    @classmethod
    def from_env(cls) -> "FaultInjector | None":
        faults = envs.read(envs.FAULT_INJECTION)
        return cls(faults) if faults else None

    def draw(self) -> str | None:
        """This draft step's fault, or None."""
        for i, (_, fraction) in enumerate(self.faults):
            self._due[i] += fraction
        i = max(range(len(self.faults)), key=self._due.__getitem__)
        if self._due[i] < 1.0 - 1e-9:
            return None
        self._due[i] -= 1.0
        kind = self.faults[i][0]
        self.counts[kind] += 1
        return kind

    @staticmethod
    def before_draft(kind: str | None) -> None:
        if kind == "raise":
            raise InjectedFault("dspark-plugin fault injection: the draft step raised")
        if kind == "stall":
            time.sleep(STALL_S)

    @staticmethod
    def on_backbone(kind: str | None, h: torch.Tensor) -> torch.Tensor:
        return torch.full_like(h, float("nan")) if kind == "nan" else h

    @staticmethod
    def on_tokens(kind: str | None, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
        if kind != "out_of_range":
            return tokens
        tokens = tokens.clone()
        tokens[:, 0] = vocab_size + 7
        return tokens
