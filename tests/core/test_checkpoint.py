"""DeepSpec-format checkpoints: exact names, bit-exact round trip, hand-written configs load."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_plugin.checkpoint.deepspec import load_drafter, save_drafter
from dspark_plugin.config.drafter_config import DSparkConfig
from dspark_plugin.reference.runner import ReferenceRunner
from tiny import tiny_drafter, tiny_target

DEEPSPEC_LAYER_NAMES = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
]


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn", "none"])
def test_round_trip_is_bit_exact(tmp_path, head):
    target = tiny_target()
    drafter = tiny_drafter(target, head, layers=2)
    save_drafter(drafter, tmp_path / "a")
    names = set(load_file(tmp_path / "a" / "model.safetensors"))
    expected = {f"layers.{i}.{n}" for i in range(2) for n in DEEPSPEC_LAYER_NAMES}
    expected |= {"fc.weight", "hidden_norm.weight", "norm.weight"}
    if head != "none":
        expected |= {"markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
                     "confidence_head.proj.weight", "confidence_head.proj.bias"}
    expected |= {"gated": {"markov_head.gate_proj.weight", "markov_head.gate_proj.bias"},
                 "rnn": {"markov_head.joint_proj.weight", "markov_head.joint_proj.bias"}}.get(head, set())
    assert names == expected

    loaded = load_drafter(tmp_path / "a", target=target)
    for (n1, t1), (n2, t2) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    save_drafter(loaded, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(
        (tmp_path / "b" / "config.json").read_text())
    # Same drafts from the original and the reloaded drafter.
    prompt = [3, 4, 5, 6]
    a = ReferenceRunner(target, drafter).generate(prompt, 24)
    b = ReferenceRunner(target, loaded).generate(prompt, 24)
    assert a.tokens == b.tokens and a.accepted == b.accepted


def test_low_precision_storage_and_dtype_conversion(tmp_path):
    target = tiny_target()
    drafter = tiny_drafter(target, "rnn")
    save_drafter(drafter, tmp_path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "model.safetensors").values())
    loaded = load_drafter(tmp_path, target=target)  # follows the target's dtype
    assert loaded.dtype == torch.float32
    w = drafter.markov_head.markov_w2.weight
    assert torch.equal(loaded.markov_head.markov_w2.weight, w.to(torch.bfloat16).float())


def handwritten_checkpoint(path, target, head_type="gated", rank=8, layers=1):
    """A DeepSpec-style drafter written by hand: target config + DSpark keys, tensors by name."""
    tc = target.config
    d, v, inter, heads, kv, hd = tc.hidden_size, tc.vocab_size, 48, 4, 2, 8
    config = tc.to_dict()
    config.update(architectures=["Qwen3DSparkModel"], model_type="qwen3", num_hidden_layers=layers,
                  num_target_layers=tc.num_hidden_layers, intermediate_size=inter, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=hd, block_size=5, mask_token_id=v - 2,
                  target_layer_ids=[1, 3], markov_rank=rank, markov_head_type=head_type,
                  enable_confidence_head=True, confidence_head_with_markov=True, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    t = {"fc.weight": r(d, 2 * d), "hidden_norm.weight": 1 + r(d), "norm.weight": 1 + r(d),
         "markov_head.markov_w1.weight": r(v, rank), "markov_head.markov_w2.weight": r(v, rank),
         "markov_head.gate_proj.weight": r(rank, d + rank), "markov_head.gate_proj.bias": r(rank),
         "confidence_head.proj.weight": r(1, d + rank), "confidence_head.proj.bias": r(1)}
    for i in range(layers):
        p = f"layers.{i}."
        t.update({p + "self_attn.q_proj.weight": r(heads * hd, d), p + "self_attn.k_proj.weight": r(kv * hd, d),
                  p + "self_attn.v_proj.weight": r(kv * hd, d), p + "self_attn.o_proj.weight": r(d, heads * hd),
                  p + "self_attn.q_norm.weight": 1 + r(hd), p + "self_attn.k_norm.weight": 1 + r(hd),
                  p + "mlp.gate_proj.weight": r(inter, d), p + "mlp.up_proj.weight": r(inter, d),
                  p + "mlp.down_proj.weight": r(d, inter), p + "input_layernorm.weight": 1 + r(d),
                  p + "post_attention_layernorm.weight": 1 + r(d)})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(path / "model.safetensors"))
    return t


def test_handwritten_deepspec_checkpoint_loads(tmp_path):
    target = tiny_target(kind="qwen3")
    tensors = handwritten_checkpoint(tmp_path, target)
    drafter = load_drafter(tmp_path, target=target)
    assert drafter.cfg.markov_head_type == "gated" and drafter.num_drafts == 5
    assert torch.equal(drafter.markov_head.gate_proj.weight, tensors["markov_head.gate_proj.weight"].to(torch.bfloat16).float())
    assert torch.equal(drafter.backbone.layers[0].self_attn.q_norm.weight,
                       tensors["layers.0.self_attn.q_norm.weight"].to(torch.bfloat16).float())
    ref = ReferenceRunner(target).generate([5, 6, 7], 32)
    res = ReferenceRunner(target, drafter).generate([5, 6, 7], 32)
    assert res.tokens == ref.tokens


def test_model_prefix_and_speculators_form(tmp_path):
    target = tiny_target(kind="qwen3")
    tensors = handwritten_checkpoint(tmp_path / "native", target, head_type="vanilla")
    tensors = {k: v for k, v in tensors.items() if "gate_proj" not in k or k.startswith("layers.")}
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    dspark_keys = ("block_size", "mask_token_id", "target_layer_ids", "markov_rank", "markov_head_type",
                   "enable_confidence_head", "confidence_head_with_markov", "num_target_layers")
    spec = {"speculators_model_type": "dspark", "architectures": ["DSparkSpeculator"],
            "transformer_layer_config": {k: v for k, v in native.items() if k not in dspark_keys},
            **{k: native[k] for k in dspark_keys}}
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "config.json").write_text(json.dumps(spec))
    save_file({"model." + k: v for k, v in tensors.items()}, str(tmp_path / "spec" / "model.safetensors"))
    a = DSparkConfig.from_dir(tmp_path / "native")
    b = DSparkConfig.from_dir(tmp_path / "spec")
    assert (a.block_size, a.target_layer_ids, a.markov_rank, a.hidden_size) == (
        b.block_size, b.target_layer_ids, b.markov_rank, b.hidden_size)
    drafter = load_drafter(tmp_path / "spec", target=target)
    assert torch.equal(drafter.backbone.fc.weight, tensors["fc.weight"])
