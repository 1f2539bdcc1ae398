"""Every `DSPARK_*` environment switch, declared once: name, type, default, meaning; one parser.

Code reads a switch with `read(NAME)` (or `read(NAME, env)` for an explicit mapping), never through
`os.environ` directly. A value is read when the code asks for it (tests and the kernel dispatch flip
switches at run time) and parsed once per distinct value; a bad value raises `DSparkEnvError`
naming the variable, the value and what it accepts. `markdown_table()` renders the list for the
README.

Variables that only the project's tests and scripts read (an end-to-end drafter, the models and
source directories of docker/install.sh) are not switches of the package; they are documented
where they are used. tests/core/test_envs.py checks that the package names no other DSPARK_ variable.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dspark_plugin.errors import DSparkError

# Kinds: "choice" (one of `choices`, case-insensitive), "on_off" ("on" / "off" -> bool),
# "flag" ("0" / "1" -> bool), "path" (any path), "file" (an existing file), "names" (comma list),
# "faults" (comma list of KIND:FRACTION -> ((kind, fraction), ...), fractions summing to at most 1).
FAULT_KINDS = ("raise", "nan", "out_of_range", "stall")


class DSparkEnvError(DSparkError):
    """A DSPARK_* variable holds a value its declaration does not accept."""


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: str
    default: Any
    meaning: str
    choices: tuple[str, ...] = ()
    default_text: str | None = None  # how the table shows the default, when not the value itself
    internal: bool = False           # set by the package itself, not by users
    what: str = "file"               # kind "file": what the file is, for the error

    @property
    def type_text(self) -> str:
        return {"choice": " \\| ".join(self.choices), "on_off": "on \\| off", "flag": "0 \\| 1",
                "path": "directory", "file": "file", "names": "comma-separated names",
                "faults": "KIND:FRACTION,..."}[self.kind]


_VARS: tuple[EnvVar, ...] = (
    EnvVar("DSPARK_SCHEDULER", "choice", None,
           "vLLM proposer's verify lengths: `early_stop` (Algorithm 1, lossless), `async` (budget from "
           "survivals two steps old) or `fixed` (the full block every step)",
           choices=("early_stop", "async", "fixed"),
           default_text="`early_stop` (a drafter without a confidence head: `fixed`)"),
    EnvVar("DSPARK_SPS", "file", None,
           "SPS curve JSON (`dspark profile --engine vllm --out FILE`) for the vLLM scheduler",
           default_text="`<drafter>/dspark_sps.json`, then the cache", what="SPS file"),
    EnvVar("DSPARK_ONLINE_SPS", "on_off", True,
           "with no profiled SPS curve, learn it from the served steps (saved in the cache dir for the next "
           "start); `off`: the full block every step"),
    EnvVar("DSPARK_PLAN_SEEDED", "on_off", False,
           "plan the verify length of seeded sampled requests too (faster; their output then depends on the "
           "batch and on timing, not only on the seed); `off`: they verify the full block and every step drafts"),
    EnvVar("DSPARK_DRAFT_GATE", "on_off", True,
           "with the scheduler on, skip a step's draft where drafting has been earning fewer tokens/s than not"),
    EnvVar("DSPARK_CONTEXT_LOOKUP", "on_off", True,
           "per request, draft a copy of what followed the last occurrence of the current 2-4 token suffix "
           "(prompt lookup) where it is expected to survive longer than the drafter's block; `off`: the drafter only"),
    EnvVar("DSPARK_DEFER_CONTEXT", "on_off", True,
           "a step without a draft keeps its context K/V for the next draft to write (`off`: written in the step)"),
    EnvVar("DSPARK_CACHE_DIR", "path", None,
           "where SPS curves are cached: profiled (`sps.json`) and learned online (`online_sps.json`)",
           default_text="`~/.cache/dspark`"),
    EnvVar("DSPARK_BLOCK_LOOP", "choice", "auto",
           "draft a block in one kernel launch (`on`), one launch per position (`off`), or let dispatch pick",
           choices=("auto", "on", "off")),
    EnvVar("DSPARK_DISABLE_TRITON", "flag", False,
           "1: every kernel operation runs its PyTorch twin, never Triton"),
    EnvVar("DSPARK_FORCE_TRITON", "flag", False,
           "1: every kernel operation runs Triton (CPU tensors need `TRITON_INTERPRET=1`)"),
    EnvVar("DSPARK_KERNELS_POISON", "flag", False,
           "1: kernel outputs are pre-filled with NaN / -1, so tests prove every element is written"),
    EnvVar("DSPARK_KERNELS_TWO_LAUNCH", "flag", False,
           "1: the split Markov-step kernel merges its partials in a second launch instead of the atomic ticket"),
    EnvVar("DSPARK_DISABLE_PATCHES", "names", frozenset(),
           "engine patches not to install (file names in `dspark_plugin/vllm/patches/` or `dspark_plugin/sglang/patches/`)",
           default_text="none"),
    EnvVar("DSPARK_FAULT_INJECTION", "faults", (),
           "tests only: make the vLLM proposer fail on purpose on a fraction of draft steps; kinds "
           "`raise`, `nan`, `out_of_range` (token ids past the vocabulary), `stall` (0.2 s), e.g. `raise:0.1,nan:0.1`",
           default_text="none"),
    EnvVar("DSPARK_VLLM_LAUNCHER_REEXEC", "flag", False,
           "set by `dspark-vllm` on its one re-execution with `LD_PRELOAD`", internal=True),
)
VARS: dict[str, EnvVar] = {v.name: v for v in _VARS}

SCHEDULER = "DSPARK_SCHEDULER"
SPS = "DSPARK_SPS"
DRAFT_GATE = "DSPARK_DRAFT_GATE"
ONLINE_SPS = "DSPARK_ONLINE_SPS"
PLAN_SEEDED = "DSPARK_PLAN_SEEDED"
DEFER_CONTEXT = "DSPARK_DEFER_CONTEXT"
CONTEXT_LOOKUP = "DSPARK_CONTEXT_LOOKUP"
CACHE_DIR = "DSPARK_CACHE_DIR"
BLOCK_LOOP = "DSPARK_BLOCK_LOOP"
DISABLE_TRITON = "DSPARK_DISABLE_TRITON"
FORCE_TRITON = "DSPARK_FORCE_TRITON"
KERNELS_POISON = "DSPARK_KERNELS_POISON"
KERNELS_TWO_LAUNCH = "DSPARK_KERNELS_TWO_LAUNCH"
DISABLE_PATCHES = "DSPARK_DISABLE_PATCHES"
VLLM_LAUNCHER_REEXEC = "DSPARK_VLLM_LAUNCHER_REEXEC"
FAULT_INJECTION = "DSPARK_FAULT_INJECTION"


def _error(var: EnvVar, raw: str, why: str) -> DSparkEnvError:
    return DSparkEnvError(f"environment variable {var.name}: {raw!r} {why}")


@functools.lru_cache(maxsize=256)
def _parse(name: str, raw: str) -> Any:
    """One parser for every kind; `raw` is the non-empty (stripped) value."""
    var = VARS[name]
    if var.kind == "choice":
        value = raw.lower()
        if value not in var.choices:
            raise _error(var, raw, f"is not one of {', '.join(var.choices)}")
        return value
    if var.kind == "on_off":
        value = raw.lower()
        if value not in ("on", "off"):
            raise _error(var, raw, "is not one of on, off")
        return value == "on"
    if var.kind == "flag":
        if raw not in ("0", "1"):
            raise _error(var, raw, "is not one of 0, 1")
        return raw == "1"
    if var.kind == "names":
        return frozenset(n.strip() for n in raw.split(",") if n.strip())
    if var.kind == "faults":
        faults = []
        for item in (i.strip() for i in raw.split(",") if i.strip()):
            kind, _, fraction = item.partition(":")
            try:
                value = float(fraction)
            except ValueError:
                value = -1.0
            if kind not in FAULT_KINDS or not 0 < value <= 1:
                raise _error(var, raw, f"has {item!r}: expected KIND:FRACTION with KIND one of "
                                       f"{', '.join(FAULT_KINDS)} and 0 < FRACTION <= 1")
            faults.append((kind, value))
        if sum(f for _, f in faults) > 1 + 1e-9:
            raise _error(var, raw, "has fractions summing to more than 1")
        return tuple(faults)
    return raw  # path / file: checked by read (a file may appear later)


def read(name: str, env: Mapping[str, str] | None = None) -> Any:
    """The parsed value of switch `name` in `env` (default: the process environment, read now)."""
    var = VARS[name]
    raw = (os.environ if env is None else env).get(name)
    raw = (raw or "").strip()
    if not raw:
        return var.default
    if var.kind == "file" and not os.path.isfile(raw):
        raise DSparkEnvError(f"environment variable {name}: {raw}: {var.what} not found")
    return _parse(name, raw)


def markdown_table(include_internal: bool = False) -> str:
    """The switches as a markdown table (variable, values, default, meaning)."""
    rows = ["| variable | values | default | meaning |", "|---|---|---|---|"]
    for var in _VARS:
        if var.internal and not include_internal:
            continue
        if var.default_text is not None:
            default = var.default_text
        elif isinstance(var.default, bool):
            default = f"`{('on' if var.default else 'off') if var.kind == 'on_off' else int(var.default)}`"
        else:
            default = f"`{var.default}`"
        rows.append(f"| `{var.name}` | {var.type_text} | {default} | {var.meaning} |")
    return "\n".join(rows) + "\n"
