"""Benchmark of the fused drafting step: Triton kernel vs PyTorch twin vs memory-bandwidth floor.

GPU mode (default): for B in {1, 16, 128}, V in {49152, 151936}, r in {64, 256} (bf16 head weights,
float32 base logits U_k, d = 4096 confidence input), times with CUDA events:
  - fused greedy step, fused sampled step (token + log-prob), fused sampled step + full probs row;
  - the PyTorch twin for the same sampled step with the probs row (what the core ran before);
  - the floor: bytes that must move (W2 rows V*r*2 + U read B*V*4 [+ probs row written B*V*4])
    over the bandwidth of a large device-to-device copy measured first.
It also checks on the GPU that kernel and twin agree (greedy tokens, sampled tokens, log-probs).
Prints a table and writes JSON. Sized for one 10-minute device run.

--smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (set before Triton loads), so a test keeps the
script from rotting on machines without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from dspark_plugin.kernels.markov_step import markov_step_torch, markov_step_triton  # noqa: E402
from dspark_plugin.kernels.weights import HeadWeights  # noqa: E402

GPU_GRID = dict(B=[1, 16, 128], V=[49152, 151936], r=[64, 256], d=4096)
SMOKE_GRID = dict(B=[1, 3], V=[97, 200], r=[16], d=24)


def timer(device: torch.device, fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, smoke: bool) -> float:
    """Bytes/s of a large device copy (read + write counted)."""
    n = (1 << 20) if smoke else (1 << 30)  # 1 GiB on the GPU, well past L2
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(device, lambda: dst.copy_(src), warmup=2, iters=3 if smoke else 10)
    return 2 * n / (ms / 1e3)


def make_case(b: int, v: int, r: int, d: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = HeadWeights(
        "vanilla",
        w1=(rn(v, r) * 0.5).to(device, dtype), w2=(rn(v, r) * 0.1).to(device, dtype),
        conf_w=(rn(1, d + r) * 0.02).to(device, dtype), conf_b=torch.zeros(1, device=device, dtype=dtype),
    )
    base = (rn(b, v) * 3).to(device)
    prev = torch.randint(0, v, (b,), generator=g).to(device)
    h = rn(b, d).to(device, dtype)
    seeds = torch.randint(0, 2**32, (b,), generator=g).to(device)
    return w, base, prev, h, seeds


def run(args) -> dict:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter gets bf16 wrong
    grid = SMOKE_GRID if smoke else GPU_GRID
    warmup, iters = (1, 2) if smoke else (3, args.iters)
    bw = copy_bandwidth(device, smoke)
    rows = []
    for v in grid["V"]:
        for r in grid["r"]:
            for b in grid["B"]:
                w, base, prev, h, seeds = make_case(b, v, r, grid["d"], device, dtype)
                greedy_t = torch.zeros(b, device=device)
                sample_t = torch.ones(b, device=device)
                f_greedy = lambda: markov_step_triton(w, base, prev, h, None, greedy_t, seeds, 0, 0, False, sample=False)  # noqa: E731,E501
                f_sample = lambda: markov_step_triton(w, base, prev, h, None, sample_t, seeds, 0, 0, False, sample=True)  # noqa: E731,E501
                f_probs = lambda: markov_step_triton(w, base, prev, h, None, sample_t, seeds, 0, 0, True, sample=True)  # noqa: E731,E501
                f_twin = lambda: markov_step_torch(w, base, prev, h, None, sample_t, seeds, 0, 0, True)  # noqa: E731
                # agreement on this device
                kg, tg = f_greedy(), markov_step_torch(w, base, prev, h, None, greedy_t, seeds, 0)
                kp, tp = f_probs(), f_twin()
                check = dict(
                    greedy_tokens_equal=float((kg.token == tg.token).float().mean()),
                    sampled_tokens_equal=float((kp.token == tp.token).float().mean()),
                    logprob_max_abs_diff=float((kp.logprob - tp.logprob).abs().max()),
                    probs_max_abs_diff=float((kp.probs - tp.probs).abs().max()),
                    conf_max_abs_diff=float((kp.conf_logit - tp.conf_logit).abs().max()),
                )
                times = {name: timer(device, fn, warmup, iters)
                         for name, fn in [("fused_greedy_ms", f_greedy), ("fused_sample_ms", f_sample),
                                          ("fused_sample_probs_ms", f_probs), ("twin_sample_probs_ms", f_twin)]}
                elt = torch.finfo(dtype).bits // 8
                bytes_step = v * r * elt + b * v * 4
                bytes_probs = bytes_step + 2 * b * v * 4  # the row is written, then normalised in place
                row = dict(B=b, V=v, r=r, **times,
                           floor_ms=bytes_step / bw * 1e3, floor_probs_ms=bytes_probs / bw * 1e3, **check)
                rows.append(row)
                print(f"B={b:4d} V={v:6d} r={r:3d}  fused greedy {row['fused_greedy_ms']:.4f}  sample "
                      f"{row['fused_sample_ms']:.4f}  +probs {row['fused_sample_probs_ms']:.4f}  twin "
                      f"{row['twin_sample_probs_ms']:.4f}  floor {row['floor_ms']:.4f}/{row['floor_probs_ms']:.4f} ms"
                      f"  agree g={check['greedy_tokens_equal']:.2f} s={check['sampled_tokens_equal']:.2f}",
                      flush=True)
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        mode="smoke" if smoke else "gpu", dtype=str(dtype), copy_bandwidth_GBps=bw / 1e9,
        torch=torch.__version__, rows=rows,
    )


def table(result: dict) -> str:
    head = ("| B | V | r | fused greedy ms | fused sample ms | + probs row ms | twin (+probs) ms | floor ms "
            "| floor (+probs) ms | x floor | greedy agree | sample agree |")
    lines = [f"{result['mode']} run {result['date']} on {result['device']} ({result['dtype']}), "
             f"copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        lines.append(
            f"| {r['B']} | {r['V']} | {r['r']} | {r['fused_greedy_ms']:.4f} | {r['fused_sample_ms']:.4f} | "
            f"{r['fused_sample_probs_ms']:.4f} | {r['twin_sample_probs_ms']:.4f} | {r['floor_ms']:.4f} | "
            f"{r['floor_probs_ms']:.4f} | {r['fused_sample_ms'] / r['floor_ms']:.1f} | "
            f"{r['greedy_tokens_equal']:.2f} | {r['sampled_tokens_equal']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "work_cache"), "kernels_bench.json"))
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    result = run(args)
    text = table(result)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
