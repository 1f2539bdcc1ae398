"""DSpark through SGLang on CPU, end to end: `dspark-sglang ... --speculative-algorithm DSPARK
--speculative-draft-model-path DRAFTER` (renamed to the plugin's PLUGIN_DSPARK on CPU) serves
SmolLM2-135M-Instruct with the product drafter (pruned 8k draft vocabulary) on real servers on 127.0.0.1:
the defaults (the core's verify planner, step rate learned from nothing, draft gate) and
DSPARK_SCHEDULER=fixed (the full block every step). Greedy outputs of 10 prompts sent 4 at a time equal
the target's own greedy outputs (Hugging Face transformers, i.e. what the plain server gives:
test_sglang_serving.py) on both, and the fixed server's spec counters (`spec_verify_ct`,
`spec_num_correct_drafts`) equal the core's reference runner's rounds and accepted drafts on the same
prompts, so drafts are accepted exactly where the reference accepts them; a prompt sent again hits the
radix cache and is drafted from the cached prefix's context the same way (same counters). Among the
default server's, requests with penalties + a logit bias, a regex grammar, min-p + min_new_tokens are decoded by
SGLang's own sampler without drafts, with the outputs those settings give, and the server stays up.
Sampling: the second token of 300 two-token requests (drafted and rejection-sampled by the plugin)
follows the target's exact conditional distribution (chi-square), at T = 1 and at T = 0.7 with top-k
and top-p; and the distribution the worker accepts against is the one SGLang's sampler draws from.

Slow (a server start is ~100 s on the 2-core machine). Skips where SGLang is not installed."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dspark_plugin.sglang.versions import installed_sglang


# Asked of the installed distributions, not the import system: under pytest this directory
# (tests/sglang/) can itself be found as a namespace package named `sglang`.
if installed_sglang().version is None:
    pytest.skip("sglang is not installed (the SGLang tests run in their own venv, .venv-sglang)",
                allow_module_level=True)

import torch  # noqa: E402

from dspark_plugin.sglang import launcher  # noqa: E402
from harness import processes  # noqa: E402
from harness.shared_data import DATA  # noqa: E402
from harness.vllm_testing import smollm2_target  # noqa: E402
from harness.sglang_serving import free_port, launch, wait_healthy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# The product drafter (a pruned 8k draft vocabulary), as in the README.
DRAFTER = REPO / "drafters" / "smollm2-135m-dspark-vanilla-b7-v8k"
SPEC_ARGS = ["--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", str(DRAFTER)]
NEW_TOKENS = 48
EOS = 2   # <|im_end|>: SmolLM2-Instruct's end of turn, where SGLang stops a chat answer


def prompts() -> list[str]:
    gsm = [json.loads(line)["question"] for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()[:6]]
    mt = [json.loads(line)["turns"][0] for line in (DATA / "mt_bench.jsonl").read_text().splitlines()[:4]]
    return [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in gsm + mt]


def generate(port: int, text: str, **sampling: object) -> dict:
    import urllib.request

    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, **sampling}
    body = json.dumps({"text": text, "sampling_params": params}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


# Requests SGLang's own sampler must decode (worker.needs_plain_decoding), sent among the greedy ones so
# batches mix rows drafted by the plugin with rows decoded without drafts.
CAPITAL = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PENALTIES = {"frequency_penalty": 0.6, "presence_penalty": 0.4}


def special_requests(first_token: int) -> dict[str, tuple[str, dict]]:
    return {"penalties+bias": (prompts()[0], {**PENALTIES, "logit_bias": {str(first_token): -100.0}}),
            # Under this grammar greedy starts "Paris" (logit 26.1; "B" of Berlin 24.1): with "London"
            # allowed, "L" (26.13) would beat "Paris" by 0.03, too close to pin across CPUs.
            "regex": (CAPITAL, {"regex": "(Paris|Rome|Berlin)"}),
            "min_p+min_new_tokens": (prompts()[1], {"temperature": 0.8, "min_p": 0.1, "min_new_tokens": 12,
                                                    "max_new_tokens": 16})}


def first_greedy_token(target_dir: Path, text: str) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return int(target(tok(text, return_tensors="pt").input_ids).logits[0, -1].argmax())


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Two PLUGIN_DSPARK servers, started and served side by side (one core each): the defaults (verify
    planner with a step rate learned from nothing, draft gate) get the greedy prompts and the special
    requests; DSPARK_SCHEDULER=fixed (the full block every step, as the reference runner verifies) gets the
    greedy prompts. 4 requests in flight on each: batches of several, joining and finishing."""
    if not DRAFTER.is_dir():
        pytest.skip(f"no drafter at {DRAFTER}")
    assert launcher.entry_point_installed(), (
        f"{launcher.ENTRY_POINT_GROUP}: dspark = {launcher.ENTRY_POINT} is not installed: pip install the package")
    target = smollm2_target()
    special = special_requests(first_greedy_token(target, prompts()[0]))
    tmp = tmp_path_factory.mktemp("servers")
    env = dict(os.environ, DSPARK_CACHE_DIR=str(tmp / "cache"))   # no curve learned by an earlier run
    jobs = {"default": [(text, {}) for text in prompts()], "fixed": [(text, {}) for text in prompts()]}
    jobs["default"][2:2] = list(special.values())
    ports = {name: free_port() for name in jobs}
    procs = {}
    try:
        for name in jobs:
            with open(tmp / f"server-{name}.log", "w") as log:
                procs[name] = launch(target, ports[name], SPEC_ARGS, log,
                                     env={**env, "DSPARK_SCHEDULER": "fixed"} if name == "fixed" else env)
        for name, proc in procs.items():
            wait_healthy(ports[name], proc)

        def serve(name: str) -> list[dict]:
            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(lambda job: generate(ports[name], job[0], **job[1]), jobs[name]))

        with ThreadPoolExecutor(2) as both:
            outs = dict(zip(jobs, both.map(serve, jobs)))
        alive = generate(ports["default"], prompts()[0])   # the server still serves after them all
        # A prompt served before, again: a radix-cache hit (the drafter's context of the cached prompt
        # comes from SGLang's slots, written when it was first computed).
        again = generate(ports["fixed"], prompts()[0])
    finally:
        for proc in procs.values():
            processes.stop_group(proc.pid)
    logs = {name: (tmp / f"server-{name}.log").read_text() for name in jobs}
    assert all("PLUGIN_DSPARK: drafter" in log for log in logs.values())
    special_outs = dict(zip(special, outs["default"][2:2 + len(special)]))
    del outs["default"][2:2 + len(special)]
    return {"greedy": outs["default"], "fixed": outs["fixed"], "special": special_outs, "requests": special,
            "alive": alive, "again": again, "log": logs["default"], "fixed_log": logs["fixed"]}


@pytest.mark.slow
def test_greedy_outputs_equal_the_targets_and_drafts_are_accepted_as_in_the_reference(served, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.reference.runner import ReferenceRunner

    target_dir = smollm2_target()
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    runner = ReferenceRunner(target, load_drafter(DRAFTER, target=target))
    accepted = 0
    for text, out, default in zip(prompts(), served["fixed"], served["greedy"]):
        enc = tok(text, return_tensors="pt")
        plain = target.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=EOS, pad_token_id=tok.pad_token_id)
        want = plain[0, enc.input_ids.shape[1]:].tolist()
        assert out["output_ids"] == want, text
        assert default["output_ids"] == want, text   # the defaults: planned verify lengths, the draft gate
        ref = runner.generate(enc.input_ids[0].tolist(), NEW_TOKENS, eos_token_ids={EOS})
        assert ref.tokens == want
        meta = out["meta_info"]
        assert (meta["spec_verify_ct"], meta["spec_num_correct_drafts"]) == (ref.num_rounds, sum(ref.accepted)), text
        accepted += meta["spec_num_correct_drafts"]
    assert accepted > 0
    assert served["alive"]["output_ids"] == served["greedy"][0]["output_ids"]
    # The repeated prompt hit the radix cache and was drafted from the cached prefix's context exactly as
    # the first time: same output, same verify rounds, same accepted drafts.
    again, first = served["again"], served["fixed"][0]
    assert again["meta_info"]["cached_tokens"] >= len(tok(prompts()[0]).input_ids) - 1
    assert again["output_ids"] == first["output_ids"]
    assert ((again["meta_info"]["spec_verify_ct"], again["meta_info"]["spec_num_correct_drafts"])
            == (first["meta_info"]["spec_verify_ct"], first["meta_info"]["spec_num_correct_drafts"]))
    assert "dspark-plugin scheduler: fixed (requested fixed)" in served["fixed_log"]
    assert "dspark-plugin scheduler: mode early_stop, SPS curve learned online (new; saved to" in served["log"]
    assert "dspark-plugin draft gate: on" in served["log"]
    assert sum(out["meta_info"]["spec_num_correct_drafts"] for out in served["greedy"]) > 0


@pytest.mark.slow
def test_requests_sglangs_sampler_must_decode_get_its_tokens_and_the_server_stays_up(served, one_thread):
    """Penalties + logit bias, a regex grammar, min-p + min_new_tokens: decoded without drafts by SGLang's
    own sampler (worker.needs_plain_decoding), in batches with drafted rows. Greedy with penalties and a
    bias equals the target with those applied the way SGLang applies them (output-token counts; the bias
    added); the grammar's answer is one it allows; min_new_tokens holds; the server answers after them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir = smollm2_target()
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    text, params = served["requests"]["penalties+bias"]
    ids = tok(text).input_ids
    counts = torch.zeros(target.config.vocab_size)
    want: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = target(torch.tensor([ids + want])).logits[0, -1].float()
            logits -= params["frequency_penalty"] * counts + params["presence_penalty"] * (counts > 0).float()
            for t, bias in params["logit_bias"].items():
                logits[int(t)] += bias
            want.append(int(logits.argmax()))
            counts[want[-1]] += 1
            if want[-1] == EOS:
                break
    special = served["special"]
    assert special["penalties+bias"]["output_ids"] == want
    assert special["regex"]["text"] == "Paris"
    assert 12 <= special["min_p+min_new_tokens"]["meta_info"]["completion_tokens"] <= 16
    for out in special.values():
        assert out["meta_info"]["spec_num_correct_drafts"] == 0
    for reason in ("logit_bias", "a grammar", "min_p"):   # each request's first reason is logged
        assert f"PLUGIN_DSPARK: requests with {reason} are decoded without drafts" in served["log"], reason


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (7, 0.6), (1, 1.0)])
def test_target_probs_are_the_distribution_sglang_samples_from(top_k, top_p):
    """The worker's rejection sampling targets exactly what SGLang's pytorch sampler draws from."""
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    from dspark_plugin.sglang.worker import sglang_target_probs

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 3
    temperature = 0.7
    probs = torch.softmax(logits / temperature, -1)
    k = top_k or logits.shape[-1]
    _, kept, order, _ = top_k_top_p_min_p_sampling_from_probs_torch(
        probs.clone(), torch.full((3,), k), torch.full((3,), top_p), torch.zeros(3), False, None,
        torch.zeros(3, dtype=torch.long), return_filtered_probs=True)
    want = torch.zeros_like(probs).scatter(-1, order.long(), kept)
    want = want / want.sum(-1, keepdim=True)
    assert torch.allclose(sglang_target_probs(logits, temperature, k, top_p), want, atol=1e-6)


SAMPLED_PROMPT = "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"


def _chi_square_p(counts: dict[int, int], probs: torch.Tensor, total: int, top: int = 8) -> float:
    """Pearson's test of `counts` against `probs` over the `top` likeliest tokens and the rest, keeping
    cells expected to hold at least 5."""
    from scipy.stats import chisquare

    ids = probs.topk(top).indices.tolist()
    observed = [counts.get(t, 0) for t in ids]
    expected = [float(probs[t]) * total for t in ids]
    observed.append(total - sum(observed))
    expected.append(total - sum(expected))
    cells = [(o, e) for o, e in zip(observed, expected) if e >= 5]
    obs, exp = zip(*cells)
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("params", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}])
def test_sampled_second_token_follows_the_target_distribution(tmp_path, one_thread, params):
    """Two tokens per request: the first is SGLang's own prefill sample, the second went through the
    plugin's drafting and rejection sampling. Given the most frequent first token, the second must
    follow the target's exact conditional distribution (as SGLang's sampler defines it)."""
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_plugin.sglang.worker import sglang_target_probs

    target_dir = smollm2_target()
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        proc = launch(target_dir, port, SPEC_ARGS, log)
        try:
            wait_healthy(port, proc)
            sampling = {**params, "max_new_tokens": 2, "ignore_eos": True}

            def one(_: int) -> tuple[int, ...]:
                import urllib.request

                body = json.dumps({"text": SAMPLED_PROMPT, "sampling_params": sampling}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body,
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=900) as r:
                    return tuple(json.loads(r.read())["output_ids"])

            with ThreadPoolExecutor(4) as pool:
                pairs = list(pool.map(one, range(300)))
        finally:
            processes.stop_group(proc.pid)
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    ids = tok(SAMPLED_PROMPT).input_ids
    t = params["temperature"]
    k, p = params.get("top_k", 0), params.get("top_p", 1.0)
    first, n_first = Counter(pair[0] for pair in pairs).most_common(1)[0]
    second = Counter(pair[1] for pair in pairs if pair[0] == first)
    with torch.no_grad():
        logits = target(torch.tensor([ids + [first]])).logits[0, -1]
    probs = sglang_target_probs(logits, t, k or logits.shape[-1], p)
    assert n_first >= 50, n_first
    assert _chi_square_p(second, probs, n_first) > 0.001
