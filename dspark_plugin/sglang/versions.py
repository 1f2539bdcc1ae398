"""Which SGLang builds the plugin supports, and how it tells the user.

The CPU patches (`sglang/patches/`) and the speculative worker lean on private SGLang internals
(module-level device flags, the memory pool's warm-up, the spec-registry contract), so they are
applied only to the exact versions whose sources they were checked against. Any other version
gets SGLang untouched and one clear log line saying why the plugin stays out of the way.
"""
from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "sglang"
# Versions whose sources the patches and the spec-registry hook were written against.
SUPPORTED: tuple[str, ...] = ("0.5.23",)


@dataclasses.dataclass(frozen=True)
class SglangBuild:
    version: str | None  # None: SGLang is not installed

    @property
    def release(self) -> str | None:
        """Version without a local suffix (`0.5.23+cu130` -> `0.5.23`)."""
        return None if self.version is None else self.version.split("+", 1)[0]

    @property
    def supported(self) -> bool:
        return self.release in SUPPORTED


def installed_sglang() -> SglangBuild:
    """The installed SGLang distribution (read from its metadata; importing SGLang is not needed)."""
    try:
        return SglangBuild(version(DISTRIBUTION))
    except PackageNotFoundError:
        return SglangBuild(None)


def policy_message(build: SglangBuild | None = None) -> str | None:
    """None when supported, else a one-line explanation naming what is installed and what works."""
    build = build or installed_sglang()
    if build.supported:
        return None
    wanted = ", ".join(f"{DISTRIBUTION}=={v}" for v in SUPPORTED)
    have = "SGLang is not installed" if build.version is None else f"{DISTRIBUTION}=={build.version} is installed"
    return (f"dspark-plugin: {have}, but the plugin's SGLang support is only verified for {wanted}; "
            f"SGLang is left untouched (its native DSPARK serves on CUDA, NPU and XPU).")
