#!/usr/bin/env bash
# One device run: GPU kernel tests against the twins (compiled Triton, no interpreter), then the
# benchmark table. Results land in $OUT (or work_cache/) as kernels_bench.{json,md} and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-work_cache}"; mkdir -p "$OUT"
# kernels/ installs as dspark_plugin.kernels; without installing, assemble that layout in /tmp.
SHIM="$(mktemp -d)"; cp -r dspark_plugin "$SHIM/"; rm -rf "$SHIM/dspark_plugin/kernels"; cp -r kernels "$SHIM/dspark_plugin/kernels"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
"$PY" - <<'PY' 2>&1 | tee "$OUT/gpu_check.log"
# Quick compiled-kernel agreement on CUDA (the CPU tests cover the interpreter).
import torch
from dspark_plugin.kernels import dispatch
from dspark_plugin.kernels.markov_step import markov_step_torch, markov_step_triton
from dspark_plugin.kernels.weights import HeadWeights
dev = "cuda"
for kind in ["vanilla", "gated", "rnn"]:
    for b, v, r, k, ticket in [(1, 49152, 64, 0, True), (16, 151936, 256, 0, True), (128, 49152, 256, 0, False),
                                (16, 49152, 64, 20, True)]:
        d = 256
        g = torch.Generator().manual_seed(b + v)
        rn = lambda *s: torch.randn(*s, generator=g)
        pw = pb = None
        if kind == "gated": pw, pb = rn(r, d + r) * 0.05, rn(r) * 0.1
        if kind == "rnn": pw, pb = rn(3 * r, 2 * r + d) * 0.05, rn(3 * r) * 0.1
        w = HeadWeights(kind, rn(v, r).to(dev), (rn(v, r) * 0.2).to(dev), None if pw is None else pw.to(dev),
                        None if pb is None else pb.to(dev), rn(1, d + r).to(dev), rn(1).to(dev), True)
        base, prev, h = (rn(b, v) * 3).to(dev), torch.randint(0, v, (b,), generator=g).to(dev), rn(b, d).to(dev)
        st = rn(b, r).to(dev) if kind == "rnn" else None
        temp = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.arange(b) % 4].to(dev)
        seeds = torch.randint(0, 2**32, (b,), generator=g).to(dev)
        for rep in range(3):  # the ticket counters must re-arm between launches
            a = markov_step_triton(w, base, prev, h, st, temp, seeds, rep, k, True, ticket=ticket)
            t = markov_step_torch(w, base, prev, h, st, temp, seeds, rep, k, True)
            print(kind, b, v, r, k, ticket, rep, "tok", float((a.token == t.token).float().mean()),
                  "logp", float((a.logprob - t.logprob).abs().max()), "probs", float((a.probs - t.probs).abs().max()),
                  "conf", float((a.conf_logit - t.conf_logit).abs().max()), flush=True)
print("backend on cuda:", dispatch.backend(torch.zeros(1, device=dev)))
PY
"$PY" benchmarks/kernels.py --out "$OUT/kernels_bench.json" 2>&1 | tee "$OUT/bench.log"
