"""What every patch in this folder goes through: one switch list, one guard per attribute, one
source check.

`DSPARK_DISABLE_PATCHES` is a comma-separated list of patch names (the file names of this folder,
listed in `__init__.INDEX`) that must not be installed; an unknown name refuses to start, naming the
variable. `replace` refuses to patch an attribute twice (a second plugin load, or two patches
fighting over one function, would otherwise stack wrappers silently). `source_has` is how a
patch's `applies()` checks that the installed vLLM still has the code it was written against.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from dspark_plugin import envs
from dspark_plugin.errors import DSparkError

ENV_DISABLE = envs.DISABLE_PATCHES
_MARK = "_dspark_patch"


def disabled_patches(known: Iterable[str], env: Mapping[str, str] | None = None) -> frozenset[str]:
    """Names in DSPARK_DISABLE_PATCHES; one error naming the variable for a name that is not a patch."""
    names = envs.read(ENV_DISABLE, env)
    unknown = sorted(names - set(known))
    if unknown:
        raise DSparkError(f"environment variable {ENV_DISABLE}: unknown patch name(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return names


def replace(owner: Any, attr: str, new: Any, patch: str) -> Any:
    """Set `owner.attr = new` and return the original; raises if a DSpark patch already replaced it."""
    old = getattr(owner, attr)
    if getattr(old, _MARK, None) is not None:
        raise RuntimeError(f"dspark-plugin: {owner.__name__}.{attr} is already patched by "
                           f"{getattr(old, _MARK)!r}; patch {patch!r} would stack on it")
    setattr(new, _MARK, patch)
    if not hasattr(new, "__wrapped__"):  # a replacement, not a functools.wraps wrapper: keep the original
        new.__wrapped__ = old            # reachable, so `source_has` (inspect unwraps) still reads vLLM's code
    setattr(owner, attr, new)
    return old


def is_patched(owner: Any, attr: str) -> str | None:
    """The name of the DSpark patch that replaced `owner.attr`, or None."""
    return getattr(getattr(owner, attr, None), _MARK, None)


def source_has(obj: Any, needle: str) -> bool:
    """Whether `needle` occurs in the source of `obj` (False when there is no source to read)."""
    try:
        return needle in inspect.getsource(obj)
    except (OSError, TypeError):
        return False
