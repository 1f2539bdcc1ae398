"""What every runtime patch of both adapters goes through (dspark_plugin/vllm/patches/,
dspark_plugin/sglang/patches/): one switch list, one guard per attribute, one source check. Engine-free,
so an SGLang environment, which has no vLLM, imports it too.

`DSPARK_DISABLE_PATCHES` is a comma-separated list of patch names (the file names of a patch folder,
listed in its `__init__.INDEX`) that must not be installed; an unknown name refuses to start, naming the
variable. `replace` refuses to patch an attribute twice (a second plugin load, or two patches fighting
over one attribute, would otherwise stack silently). It takes functions and plain values alike (SGLang
keeps device decisions in module-level booleans such as `_is_cpu`), so what was replaced is kept in a
table, not as a mark on the new object. `source_has` is how a patch's `applies()` checks that the
installed engine still has the code it was written against.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from dspark_plugin import envs
from dspark_plugin.errors import DSparkError

ENV_DISABLE = envs.DISABLE_PATCHES
# (id(owner), attribute) -> (patch name, original value). Owners are modules and classes, which live
# as long as the process, so their ids stay valid.
_REPLACED: dict[tuple[int, str], tuple[str, Any]] = {}


def disabled_patches(known: Iterable[str], env: Mapping[str, str] | None = None) -> frozenset[str]:
    """Names in DSPARK_DISABLE_PATCHES; one error naming the variable for a name that is not a patch of
    `known` (one engine's index: the other engine's names are unknown there)."""
    names = envs.read(ENV_DISABLE, env)
    unknown = sorted(names - set(known))
    if unknown:
        raise DSparkError(f"environment variable {ENV_DISABLE}: unknown patch name(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return names


def replace(owner: Any, attr: str, new: Any, patch: str) -> Any:
    """Set `owner.attr = new` and return the original; raises if a DSpark patch already replaced it."""
    key = (id(owner), attr)
    if key in _REPLACED:
        raise RuntimeError(f"dspark-plugin: {getattr(owner, '__name__', owner)}.{attr} is already patched by "
                           f"{_REPLACED[key][0]!r}; patch {patch!r} would stack on it")
    old = getattr(owner, attr)
    if callable(new) and not hasattr(new, "__wrapped__"):
        new.__wrapped__ = old   # keeps the engine's original reachable, so `source_has` still reads its code
    setattr(owner, attr, new)
    _REPLACED[key] = (patch, old)
    return old


def is_patched(owner: Any, attr: str) -> str | None:
    """The name of the DSpark patch that replaced `owner.attr`, or None."""
    hit = _REPLACED.get((id(owner), attr))
    return None if hit is None else hit[0]


def original(owner: Any, attr: str) -> Any:
    """What `owner.attr` was before a DSpark patch replaced it (the current value when not patched)."""
    hit = _REPLACED.get((id(owner), attr))
    return getattr(owner, attr) if hit is None else hit[1]


def source_has(obj: Any, needle: str) -> bool:
    """Whether `needle` occurs in the source of `obj` (False when there is no source to read)."""
    try:
        return needle in inspect.getsource(inspect.unwrap(obj))
    except (OSError, TypeError):
        return False
