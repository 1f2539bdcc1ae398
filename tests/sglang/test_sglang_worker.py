"""DSpark through SGLang on CPU, end to end: `dspark-sglang ... --speculative-algorithm DSPARK
--speculative-draft-model-path DRAFTER` (renamed to the plugin's PLUGIN_DSPARK on CPU) serves
SmolLM2-135M-Instruct with the shipped vanilla drafter on a real server on 127.0.0.1. Greedy
outputs of 10 prompts sent 4 at a time equal the target's own greedy outputs (Hugging Face
transformers, i.e. what the plain server gives: test_sglang_serving.py), and SGLang's spec counters
(`spec_verify_ct`, `spec_num_correct_drafts`) equal the core's reference runner's rounds and accepted
drafts on the same prompts, so drafts are accepted exactly where the reference accepts them.
Sampling: the second token of 300 two-token requests (drafted and rejection-sampled by the plugin)
follows the target's exact conditional distribution (chi-square), at T = 1 and at T = 0.7 with top-k
and top-p; and the distribution the worker accepts against is the one SGLang's sampler draws from.

Slow (a server start is ~100 s on the 2-core machine). Skips where SGLang is not installed."""
from __future__ import annotations

import json
import os
import sys
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
from harness.vllm_testing import smollm2_target  # noqa: E402
from test_sglang_serving import free_port, wait_healthy  # noqa: E402  (tests/sglang/, beside this file)

REPO = Path(__file__).resolve().parents[2]
DRAFTER = REPO / "drafters" / "smollm2-135m-dspark-vanilla-b7"
DATA = REPO.parent / "shared" / "data"
NEW_TOKENS = 48
EOS = 2   # <|im_end|>: SmolLM2-Instruct's end of turn, where SGLang stops a chat answer


def prompts() -> list[str]:
    gsm = [json.loads(line)["question"] for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()[:6]]
    mt = [json.loads(line)["turns"][0] for line in (DATA / "mt_bench.jsonl").read_text().splitlines()[:4]]
    return [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in gsm + mt]


def generate(port: int, text: str) -> dict:
    import urllib.request

    body = json.dumps({"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> list[dict]:
    if not DRAFTER.is_dir():
        pytest.skip(f"no drafter at {DRAFTER}")
    assert launcher.entry_point_installed(), (
        f"{launcher.ENTRY_POINT_GROUP}: dspark = {launcher.ENTRY_POINT} is not installed: pip install the package")
    target = smollm2_target()
    port = free_port()
    env = dict(os.environ)
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    env.pop("SGLANG_PLUGINS", None)
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_path, "w") as log:
        proc = processes.popen([sys.executable, "-m", "dspark_plugin.sglang.launcher", "--model-path", str(target),
                                "--host", "127.0.0.1", "--port", str(port), "--speculative-algorithm", "DSPARK",
                                "--speculative-draft-model-path", str(DRAFTER)], stdout=log, stderr=log, env=env)
        try:
            wait_healthy(port, proc)
            with ThreadPoolExecutor(4) as pool:   # 4 requests in flight: batches of several, joining and finishing
                outs = list(pool.map(lambda p: generate(port, p), prompts()))
        finally:
            processes.stop_group(proc.pid)
    assert "PLUGIN_DSPARK: drafter" in log_path.read_text()
    return outs


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
    for text, out in zip(prompts(), served):
        enc = tok(text, return_tensors="pt")
        plain = target.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=EOS, pad_token_id=tok.pad_token_id)
        want = plain[0, enc.input_ids.shape[1]:].tolist()
        assert out["output_ids"] == want, text
        ref = runner.generate(enc.input_ids[0].tolist(), NEW_TOKENS, eos_token_ids={EOS})
        assert ref.tokens == want
        meta = out["meta_info"]
        assert (meta["spec_verify_ct"], meta["spec_num_correct_drafts"]) == (ref.num_rounds, sum(ref.accepted)), text
        accepted += meta["spec_num_correct_drafts"]
    assert accepted > 0


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
    env = dict(os.environ)
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    env.pop("SGLANG_PLUGINS", None)
    with open(tmp_path / "server.log", "w") as log:
        proc = processes.popen([sys.executable, "-m", "dspark_plugin.sglang.launcher", "--model-path", str(target_dir),
                                "--host", "127.0.0.1", "--port", str(port), "--speculative-algorithm", "DSPARK",
                                "--speculative-draft-model-path", str(DRAFTER)], stdout=log, stderr=log, env=env)
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
