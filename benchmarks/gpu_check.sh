#!/usr/bin/env bash
# One-command device check for the vLLM 0.33 (CUDA) paths of the plugin, for when a GPU is lent:
#
#   benchmarks/gpu_check.sh            # needs vllm==0.33.0 + this repo installed (docker/install.sh cuda)
#
# With a random tiny Llama target (no tokenizer, token-id prompts) and random drafters written by the
# core's save_drafter, it checks greedy losslessness (speculative == plain, token for token) for:
#   1. Model Runner V2, native `dspark`, vanilla head (vLLM's own loop; plugin class registered);
#   2. Model Runner V2, gated and rnn heads (the plugin's `sample_sequential` hook);
#   3. Model Runner V1 (VLLM_USE_V2_MODEL_RUNNER=0), the plugin's DSparkProposer, vanilla and rnn;
# plus one temperature-1.0 request per configuration. Writes gpu_check.json into $OUT (or ./runs).
# Exit code 0 = all passed, 1 = a check failed, 3 = environment not ready (message says what).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
RESULTS="${OUT:-runs}/gpu_check.json"
mkdir -p "$(dirname "$RESULTS")"

if ! "$PY" - <<'EOF'
import importlib.metadata as m, sys
try:
    v = m.version("vllm")
except m.PackageNotFoundError:
    sys.exit("gpu_check: vllm is not installed; run docker/install.sh cuda (vllm==0.33.0)")
if not v.startswith("0.33.0"):
    sys.exit(f"gpu_check: vllm {v} installed, this check is written for 0.33.0")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
import dspark_plugin  # noqa: F401
EOF
then
  exit 3
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

cat > "$WORK/check.py" <<'EOF'
import json, os, subprocess, sys, time
from pathlib import Path

WORK = Path(sys.argv[1])
RESULTS = Path(sys.argv[2])


def make_models():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.vllm_testing import random_drafter

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    target = WORK / "target"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(target)
    from dspark_plugin.config.drafter_config import DSparkConfig
    from dspark_plugin.decode.taps import tap_layer_ids

    drafters = {}
    for head in ("vanilla", "gated", "rnn"):
        dcfg = DSparkConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, vocab_size=4096, block_size=7, mask_token_id=3,
                            target_layer_ids=tap_layer_ids(8, 3), num_target_layers=8, markov_rank=32,
                            markov_head_type=head, enable_confidence_head=True, rope_theta=10000.0,
                            max_position_embeddings=2048)
        drafters[head] = random_drafter(WORK / f"drafter-{head}", dcfg, std=0.05)
    return target, drafters


RUN = r'''
import json, sys
def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    target, spec, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    kw = {"speculative_config": spec} if spec else {}
    llm = LLM(target, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=1024, seed=0,
              gpu_memory_utilization=0.3, disable_log_stats=False, **kw)
    prompts = [TokensPrompt(prompt_token_ids=[1] + [(7 * i + 13 * j) % 4000 + 5 for j in range(24 + i)])
               for i in range(12)]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48, detokenize=False))
    sampled = llm.generate(prompts[:2], SamplingParams(temperature=1.0, max_tokens=32, seed=0, detokenize=False))
    metrics = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode_num")
               and hasattr(m, "value")}
    runner = "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"
    json.dump({"greedy": [list(o.outputs[0].token_ids) for o in greedy],
               "sampled_tokens": [len(o.outputs[0].token_ids) for o in sampled],
               "metrics": metrics, "runner": runner}, open(out, "w"))
if __name__ == "__main__":
    main()
'''


def run(name, target, spec, env_extra):
    script = WORK / "run.py"
    script.write_text(RUN)
    out = WORK / f"{name}.json"
    env = dict(os.environ, VLLM_PLUGINS="dspark", **env_extra)
    t = time.time()
    proc = subprocess.run([sys.executable, str(script), str(target), json.dumps(spec), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-3000:], "seconds": time.time() - t}
    res = json.loads(out.read_text())
    res["seconds"] = time.time() - t
    return res


def main():
    target, drafters = make_models()
    results = {"plain": run("plain", target, None, {})}
    configs = {
        "v2-native-vanilla": ("vanilla", {}),
        "v2-gated": ("gated", {}),
        "v2-rnn": ("rnn", {}),
        "v1-vanilla": ("vanilla", {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
        "v1-rnn": ("rnn", {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
    }
    failed = []
    for name, (head, env) in configs.items():
        spec = {"method": "dspark", "model": str(drafters[head]), "num_speculative_tokens": 7}
        res = run(name, target, spec, env)
        want_runner = "v1" if env else "v2"
        ok = (res.get("greedy") is not None and res["greedy"] == results["plain"].get("greedy")
              and res.get("runner") == want_runner
              and res["metrics"].get("vllm:spec_decode_num_drafts", 0) > 0
              and all(n > 0 for n in res["sampled_tokens"]))
        res["ok"] = bool(ok)
        results[name] = res
        if not ok:
            failed.append(name)
        print(f"[gpu_check] {name}: {'PASS' if ok else 'FAIL'} ({res.get('runner')}, "
              f"{res.get('seconds', 0):.0f}s, metrics {res.get('metrics')})", flush=True)
    RESULTS.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "greedy"}
                                   for k, v in results.items()}, indent=2))
    print(f"[gpu_check] {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}; {RESULTS}")
    sys.exit(1 if failed else 0)


main()
EOF

# The repository root on the path: harness/ (random_drafter) lives in the checkout, not the wheel.
PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$WORK/check.py" "$WORK" "$RESULTS"
