"""`dspark-sglang`: SGLang's server command line (`python -m sglang.launch_server ...`), made to work on CPU.

PyPI's SGLang wheels are CUDA builds: its own CPU engine (`SGLANG_USE_CPU_ENGINE=1`) needs a CPU
build of `sgl_kernel` that PyPI does not ship. What does serve on a CPU host is SGLang's generic
pure-torch path, with the plugin's patches (`sglang/patches/`) and these settings, which this
launcher applies where the user has not chosen otherwise (an explicit flag or variable always wins):
- flags `--device cpu --attention-backend torch_native --sampling-backend pytorch
  --disable-cuda-graph --dtype float32 --skip-server-warmup --max-total-tokens 8192`
  (measured on a 2-core machine: float32 is the fast dtype there; the token cap keeps the KV pool,
  which SGLang otherwise sizes from free host memory, small);
- `OMP_NUM_THREADS=1` (two threads made SGLang's many small CPU ops 3-4x slower) and
  `SGLANG_NATIVE_MOVE_KV_CACHE=1` (KV moves in torch; patch `cpu_kv_copy_warmup`);
- `--speculative-algorithm DSPARK` becomes `PLUGIN_DSPARK` (SGLang's native DSPARK refuses CPU, and
  its name cannot be registered by a plugin: algorithm.py says why).
On a CUDA host (or with `--device` other than cpu) the arguments go to SGLang unchanged, and
SGLang's native DSPARK serves. Usage is exactly `python -m sglang.launch_server`'s:
`dspark-sglang --model-path MODEL --speculative-algorithm DSPARK --speculative-draft-model-path DIR`.

The plugin reaches SGLang's scheduler processes only through the `sglang.srt.plugins` entry point
(SGLang spawns them; nothing this process registers carries over), so the launcher checks that the
entry point is installed and says so in one line when it is not.
"""
from __future__ import annotations

import os
import runpy
import sys
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT = "dspark_plugin.sglang.plugin:register"

# flag -> value (None: a switch without a value), applied on CPU where the user gave no such flag.
CPU_FLAGS: dict[str, str | None] = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--sampling-backend": "pytorch",
    "--disable-cuda-graph": None,
    "--dtype": "float32",
    "--skip-server-warmup": None,
    "--max-total-tokens": "8192",
}
CPU_ENV: dict[str, str] = {"OMP_NUM_THREADS": "1", "SGLANG_NATIVE_MOVE_KV_CACHE": "1"}


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value given for `flag` (`--flag V` or `--flag=V`; "" for a bare switch), None when absent."""
    for i, arg in enumerate(argv):
        if arg == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            return "" if nxt.startswith("--") else nxt
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def serves_on_cpu(argv: list[str], cuda_available: bool) -> bool:
    device = flag_value(argv, "--device")
    if device:
        return device.split(":", 1)[0] == "cpu"
    return not cuda_available


def cpu_arguments(argv: list[str]) -> list[str]:
    """`argv` plus the CPU defaults it lacks, with `DSPARK` renamed to the plugin's algorithm."""
    from dspark_plugin.sglang.algorithm import ALGORITHM_NAME, NATIVE_NAME

    out = []
    rename_next = False
    for arg in argv:
        if rename_next and arg.upper() == NATIVE_NAME:
            arg = ALGORITHM_NAME
        elif arg.startswith("--speculative-algorithm=") and arg.split("=", 1)[1].upper() == NATIVE_NAME:
            arg = f"--speculative-algorithm={ALGORITHM_NAME}"
        rename_next = arg == "--speculative-algorithm"
        out.append(arg)
    for flag, value in CPU_FLAGS.items():
        if flag_value(out, flag) is None:
            out += [flag] if value is None else [flag, value]
    return out


def cpu_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The CPU variables, applied only where the caller has not chosen a value."""
    env = dict(os.environ if env is None else env)
    for name, value in CPU_ENV.items():
        env.setdefault(name, value)
    return env


def entry_point_installed() -> bool:
    return any(ep.value == ENTRY_POINT for ep in entry_points(group=ENTRY_POINT_GROUP))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        print(f"dspark-sglang: SGLang is not installed in this environment ({sys.executable}); it needs a venv "
              "of its own (it pins another torch than vLLM): pip install 'dspark-plugin[sglang]' there",
              file=sys.stderr)
        return 2
    import torch

    if serves_on_cpu(argv, torch.cuda.is_available()):
        argv = cpu_arguments(argv)
        # SGLang spawns its scheduler processes after this point, and they inherit the environment.
        os.environ.update(cpu_environment())
    if not entry_point_installed():
        print(f"dspark-sglang: the entry point {ENTRY_POINT_GROUP}: dspark = {ENTRY_POINT} is not installed, so "
              f"SGLang's scheduler processes will not load the plugin (install the package with pip)",
              file=sys.stderr)
    from dspark_plugin.sglang.plugin import register

    register()   # this process; SGLang's own load_plugins() below finds it registered
    sys.argv = ["sglang.launch_server", *argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
