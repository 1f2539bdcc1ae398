"""Soak: a DSpark server under a reproducible mix of real client requests for N minutes.

Starts a DSpark server (the README's form: `dspark-vllm serve TARGET --speculative-model DRAFTER`,
default settings) and a plain server of the same target, both on 127.0.0.1, then drives the DSpark
one from `--concurrency` client threads until the time is up. Request kinds (drawn from a seeded
generator, so a run is reproducible): greedy and sampled (seeded, unseeded) completions and chat,
streaming and not, `n` = 2, `logprobs` / `prompt_logprobs`, stop strings, `min_tokens`, penalties,
JSON-schema and choice structured output, a prompt near the context limit, prompts sharing a long
prefix (prefix-cache hits), clients that disconnect mid-stream, requests aborted by a client
timeout, and the requests vLLM refuses with speculation (`min_p`, `logit_bias`: expected 400).
Greedy requests come from a fixed pool; afterwards each pool entry is sent to the plain server and
every DSpark answer to it must be identical. The server's resident memory (its whole process
group) is sampled every 5 s; spec-decode counters are read at the start and the end.

Checks (exit status 1 when one fails): no 5xx and no connection failure (other than the intended
disconnects and aborts), the server alive and healthy at the end, every greedy output identical to
the plain server's, refused kinds answered 400, no leak-shaped resident memory (the end more than 10% above its
value at min(5 min, a third of the run) *and* not levelling off over the last third: see
`memory_growth`), spec-decode counters non-zero.

    python benchmarks/soak.py --target work_cache/smollm2-135m \\
        --drafter drafters/smollm2-135m-dspark-vanilla-b7-v8k --minutes 30 --concurrency 16 \\
        --out benchmarks/results/soak

Writes results.json, table.md and soak.png (latency and memory over time, with matplotlib).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import processes  # noqa: E402
from harness.shared_data import DATA  # noqa: E402
from harness.vllm_serving import VllmServer  # noqa: E402
from harness.vllm_testing import vllm_env  # noqa: E402

MAX_MODEL_LEN = 2048
GREEDY_POOL = 48          # distinct greedy requests; each is sent many times
MAX_TOKENS = 48


@dataclass
class Request:
    kind: str
    path: str
    body: dict[str, Any]
    stream: bool = False
    greedy_key: int | None = None    # index into the greedy pool (output compared with the plain server)
    expect: str = "ok"               # "ok" | "refused" (400) | "disconnect" | "abort"


@dataclass
class Record:
    kind: str
    start: float
    latency: float
    status: int                      # HTTP status; 0 = connection failure; -1 = intended disconnect / abort
    expect: str
    greedy_key: int | None = None
    text: str | None = None
    error: str | None = None
    tokens: int = 0


@dataclass
class Mix:
    prompts: list[str]
    long_prompt: str
    shared_prefix: str
    greedy: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(1234)
        for k in range(GREEDY_POOL):
            p = self.prompts[k % len(self.prompts)]
            shape = k % 6
            if shape == 0:
                req = Request("greedy-completion", "/v1/completions", {"prompt": p})
            elif shape == 1:
                req = Request("greedy-chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": p}]})
            elif shape == 2:
                req = Request("greedy-chat-stream", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": p}]}, stream=True)
            elif shape == 3:
                req = Request("greedy-stop-string", "/v1/completions", {"prompt": p, "stop": [".", "\n\n"]})
            elif shape == 4:
                req = Request("greedy-shared-prefix", "/v1/completions",
                              {"prompt": self.shared_prefix + "\n\nQuestion: " + p + "\nAnswer:"})
            else:
                req = Request("greedy-min-tokens", "/v1/completions", {"prompt": p, "min_tokens": 24})
            req.body.update(temperature=0.0, max_tokens=MAX_TOKENS)
            req.greedy_key = k
            self.greedy.append(req)
        rng.shuffle(self.greedy)

    def draw(self, rng: random.Random) -> Request:
        p = rng.choice(self.prompts)
        chat = {"messages": [{"role": "user", "content": p}]}
        r = rng.random()
        if r < 0.40:
            g = rng.choice(self.greedy)
            return Request(g.kind, g.path, dict(g.body), g.stream, g.greedy_key)
        kinds = [
            ("sampled-seeded", lambda: Request("sampled-seeded", "/v1/completions",
                                               {"prompt": p, "temperature": 0.8, "seed": rng.randrange(1 << 30)})),
            ("sampled-unseeded-chat", lambda: Request("sampled-unseeded-chat", "/v1/chat/completions",
                                                      {**chat, "temperature": 1.0, "top_p": 0.9})),
            ("sampled-stream", lambda: Request("sampled-stream", "/v1/completions",
                                               {"prompt": p, "temperature": 0.7, "top_k": 20}, stream=True)),
            ("n2", lambda: Request("n2", "/v1/completions", {"prompt": p, "temperature": 0.9, "n": 2})),
            ("logprobs", lambda: Request("logprobs", "/v1/completions", {"prompt": p, "temperature": 0.0, "logprobs": 3})),
            ("prompt-logprobs", lambda: Request("prompt-logprobs", "/v1/completions",
                                                {"prompt": p, "temperature": 0.0, "prompt_logprobs": 1})),
            ("penalties", lambda: Request("penalties", "/v1/completions",
                                          {"prompt": p, "temperature": 0.6, "presence_penalty": 0.5,
                                           "frequency_penalty": 0.3, "repetition_penalty": 1.1})),
            ("json-schema", lambda: Request("json-schema", "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Give a name and an age as JSON. " + p[:200]}],
                "temperature": 0.0, "response_format": {"type": "json_schema", "json_schema": {
                    "name": "person", "schema": {"type": "object", "properties": {
                        "name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}}}})),
            ("choice", lambda: Request("choice", "/v1/chat/completions", {
                **chat, "temperature": 0.0, "structured_outputs": {"choice": ["yes", "no", "maybe"]}})),
            ("long-prompt", lambda: Request("long-prompt", "/v1/completions",
                                            {"prompt": self.long_prompt, "temperature": 0.0})),
            ("disconnect-stream", lambda: Request("disconnect-stream", "/v1/chat/completions",
                                                  {**chat, "temperature": 0.0, "max_tokens": 200}, stream=True,
                                                  expect="disconnect")),
            ("abort", lambda: Request("abort", "/v1/completions", {"prompt": p, "temperature": 0.0, "max_tokens": 400},
                                      expect="abort")),
            ("refused-min-p", lambda: Request("refused-min-p", "/v1/completions",
                                              {"prompt": p, "temperature": 0.8, "min_p": 0.1}, expect="refused")),
            ("refused-logit-bias", lambda: Request("refused-logit-bias", "/v1/completions",
                                                   {"prompt": p, "temperature": 0.0, "logit_bias": {"42": 5.0}},
                                                   expect="refused")),
        ]
        req = rng.choice(kinds)[1]()
        req.body.setdefault("max_tokens", MAX_TOKENS)
        return req


def build_mix(target: str) -> Mix:
    from transformers import AutoTokenizer

    from dspark_plugin.reference.prompts import read_prompts

    prompts = (read_prompts(DATA / "mt_bench.jsonl", 40) + read_prompts(DATA / "gsm8k_test.jsonl", 40)
               + read_prompts(DATA / "humaneval.jsonl", 20))
    tok = AutoTokenizer.from_pretrained(target)
    # A prompt that leaves room for exactly MAX_TOKENS + a margin of the context.
    budget = MAX_MODEL_LEN - MAX_TOKENS - 16
    ids: list[int] = []
    i = 0
    while len(ids) < budget:
        ids += tok(prompts[i % len(prompts)] + "\n\n", add_special_tokens=False)["input_ids"]
        i += 1
    long_prompt = tok.decode(ids[:budget])
    shared = "\n\n".join(prompts[60:66])
    return Mix(prompts=prompts, long_prompt=long_prompt, shared_prefix=shared)


# -- client ------------------------------------------------------------------------------------
def send(url: str, req: Request, timeout: float = 600.0) -> tuple[int, str | None, str | None, int]:
    """(status, text, error, completion tokens); status -1 for an intended disconnect / abort."""
    body = {"model": "target", **req.body, "stream": req.stream}
    data = json.dumps(body).encode()
    http = urllib.request.Request(url + req.path, data=data, headers={"Content-Type": "application/json"})
    if req.expect == "abort":
        timeout = 1.0
    try:
        with urllib.request.urlopen(http, timeout=timeout) as r:
            if req.stream:
                parts, seen = [], 0
                for raw in r:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    seen += 1
                    if req.expect == "disconnect" and seen >= 3:
                        return -1, None, None, 0   # the client goes away mid-stream
                    choice = json.loads(line[6:])["choices"]
                    if choice:
                        c = choice[0]
                        parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
                return r.status, "".join(parts), None, 0
            out = json.loads(r.read())
            c = out["choices"][0]
            text = c.get("text") if "text" in c else (c.get("message") or {}).get("content")
            return r.status, text, None, int((out.get("usage") or {}).get("completion_tokens") or 0)
    except urllib.error.HTTPError as e:
        return e.code, None, e.read().decode(errors="replace")[:300], 0
    except (socket.timeout, TimeoutError) as e:
        if req.expect == "abort":
            return -1, None, None, 0
        return 0, None, f"timeout: {e}", 0
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        return 0, None, f"{type(e).__name__}: {e}", 0


def group_rss_mib(pgid: int) -> float:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in processes.group_members({pgid}):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total / 2**20


def drive(server: VllmServer, mix: Mix, minutes: float, concurrency: int, seed: int) -> tuple[list[Record], list]:
    records: list[Record] = []
    memory: list[tuple[float, float]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    stop_at = t0 + minutes * 60
    counter = iter(range(10**9))

    def worker() -> None:
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter)
            req = mix.draw(random.Random(seed * 1_000_003 + i))
            start = time.monotonic()
            status, text, error, toks = send(server.url, req)
            rec = Record(req.kind, round(start - t0, 2), round(time.monotonic() - start, 3), status, req.expect,
                         req.greedy_key, text, error, toks)
            with lock:
                records.append(rec)

    def sample_memory() -> None:
        while time.monotonic() < stop_at + 5:
            memory.append((round(time.monotonic() - t0, 1), round(group_rss_mib(server.proc.pid), 1)))
            time.sleep(5)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    mem = threading.Thread(target=sample_memory, daemon=True)
    for t in [*threads, mem]:
        t.start()
    for t in threads:
        t.join()
    mem.join(timeout=10)
    return records, memory


def memory_growth(memory: list[tuple[float, float]], minutes: float) -> str | None:
    """Why the resident memory looks like a leak, or None.

    A leak grows with the requests served, at a steady rate; a warm-up grows fast at first and levels
    off (new batch shapes as the step-rate explorations climb, the allocator's arenas, caches that
    fill: the 30-minute soak in BENCHMARKS.md grows ~12% in its first 10 minutes, then stays flat;
    a 10-minute eager run grew 9% from minute 1 to minute 8, then nothing). So two things must hold
    to fail: the end more than 10% above the value at min(5 min, a third of the run), and memory
    not levelling off: the last third of the run grew more than 1% and at least half as much as the
    middle third. A steady leak that passes the first test always fails the second (its thirds grow
    alike, >= 5% each), so what passes is growth that has slowed down by the end.
    """
    seconds = minutes * 60

    def at(t_min: float) -> float | None:
        return next((m for t, m in memory if t >= t_min), None)

    ref_t = min(300.0, seconds / 3)
    ref, middle, last = at(ref_t), at(seconds / 3), at(2 * seconds / 3)
    if ref is None or middle is None or last is None:
        return None
    end = memory[-1][1]
    if end <= 1.10 * ref:
        return None
    grew_last, grew_middle = end - last, last - middle
    if grew_last > 0.01 * last and grew_last >= 0.5 * grew_middle:
        return (f"resident memory grew {ref:.0f} -> {end:.0f} MiB after {ref_t:.0f}s (> 10%) "
                f"and is not levelling off: +{grew_middle:.0f} MiB in the middle third of the run, "
                f"+{grew_last:.0f} MiB in the last")
    return None


def check(records: list[Record], memory: list, reference: dict[int, str], healthy: bool, counters: dict,
          minutes: float) -> list[str]:
    failures = []
    for r in records:
        if r.status >= 500 or (r.status == 0):
            failures.append(f"{r.kind} at {r.start}s: status {r.status} {r.error}")
        elif r.expect == "refused" and r.status != 400:
            failures.append(f"{r.kind} at {r.start}s: expected 400, got {r.status}")
        elif r.expect == "ok" and r.status != 200:
            failures.append(f"{r.kind} at {r.start}s: status {r.status} {r.error}")
        elif r.greedy_key is not None and r.status == 200 and r.text != reference.get(r.greedy_key):
            failures.append(f"{r.kind} at {r.start}s: greedy output differs from the plain server's "
                            f"({r.text!r:.80} vs {reference.get(r.greedy_key)!r:.80})")
    if not healthy:
        failures.append("the DSpark server was not healthy at the end")
    growth = memory_growth(memory, minutes)
    if growth:
        failures.append(growth)
    if counters.get("drafts", 0) <= 0 or counters.get("accepted", 0) <= 0:
        failures.append(f"spec-decode counters did not move: {counters}")
    return failures


def main(argv: list[str] | None = None) -> int:
    processes.install_signal_handlers()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=str(REPO / "work_cache" / "smollm2-135m"))
    p.add_argument("--drafter", default=str(REPO / "drafters" / "smollm2-135m-dspark-vanilla-b7-v8k"))
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak"))
    p.add_argument("--server-args", default="", help="extra `vllm serve` arguments for both servers")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = build_mix(args.target)
    extra = ["--max-model-len", str(MAX_MODEL_LEN), *args.server_args.split()]
    spec_server = VllmServer(args.target, out / "server-dspark.log", extra_args=[
        "--speculative-model", str(Path(args.drafter).resolve()), *extra], env=vllm_env())
    t_start = time.time()
    with spec_server:
        m0 = spec_server.metrics()
        records, memory = drive(spec_server, mix, args.minutes, args.concurrency, args.seed)
        try:
            healthy = urllib.request.urlopen(spec_server.url + "/health", timeout=10).status == 200
        except (urllib.error.URLError, OSError):
            healthy = False
        m1 = spec_server.metrics() if healthy else m0
    counters = {"drafts": m1.get("vllm:spec_decode_num_drafts", 0) - m0.get("vllm:spec_decode_num_drafts", 0),
                "accepted": m1.get("vllm:spec_decode_num_accepted_tokens", 0)
                - m0.get("vllm:spec_decode_num_accepted_tokens", 0)}
    # The plain server answers each greedy pool entry once (non-streaming: the text is the same).
    reference: dict[int, str] = {}
    with VllmServer(args.target, out / "server-plain.log", extra_args=extra, env=vllm_env()) as plain:
        for g in mix.greedy:
            status, text, error, _ = send(plain.url, Request(g.kind, g.path, dict(g.body), False))
            reference[g.greedy_key] = text if status == 200 else f"<plain server: {status} {error}>"
    failures = check(records, memory, reference, healthy, counters, args.minutes)

    by_kind: dict[str, Counter] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_kind[r.kind][str(r.status)] += 1
        latency[r.kind].append(r.latency)
    greedy_checked = sum(1 for r in records if r.greedy_key is not None and r.status == 200)
    summary = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores", "minutes": args.minutes, "concurrency": args.concurrency,
        "requests": len(records), "greedy_checked": greedy_checked,
        "acceptance_length": 1 + counters["accepted"] / counters["drafts"] if counters["drafts"] else None,
        "counters": counters, "memory_mib": memory, "status_by_kind": {k: dict(v) for k, v in by_kind.items()},
        "failures": failures, "wall_seconds": round(time.time() - t_start, 1),
    }
    (out / "results.json").write_text(json.dumps({**summary, "records": [r.__dict__ for r in records]}, indent=1) + "\n")
    lines = [f"Soak {summary['date']}: {args.minutes} min at concurrency {args.concurrency}, {len(records)} requests, "
             f"{greedy_checked} greedy outputs compared, acceptance length {summary['acceptance_length']}", "",
             "| kind | requests | statuses | median latency (s) |", "|---|---|---|---|"]
    for kind in sorted(by_kind):
        lat = sorted(latency[kind])
        lines.append(f"| {kind} | {sum(by_kind[kind].values())} | "
                     f"{', '.join(f'{s}: {n}' for s, n in sorted(by_kind[kind].items()))} | {lat[len(lat) // 2]:.2f} |")
    if memory:
        lines += ["", f"resident memory (MiB, server process group): first {memory[0][1]}, max "
                      f"{max(m for _, m in memory)}, last {memory[-1][1]}"]
    lines += ["", f"failures: {len(failures)}", *[f"- {f}" for f in failures[:30]]]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        ok = [r for r in records if r.status == 200]
        a.scatter([r.start for r in ok], [r.latency for r in ok], s=4)
        a.set_ylabel("latency (s)")
        b.plot([t for t, _ in memory], [m for _, m in memory])
        b.set_ylabel("server RSS (MiB)")
        b.set_xlabel("seconds into the soak")
        fig.tight_layout()
        fig.savefig(out / "soak.png", dpi=110)
    except ImportError:
        pass
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
