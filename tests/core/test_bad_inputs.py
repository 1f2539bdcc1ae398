"""Bad drafters fail with one clear error naming the file and the key, never a traceback soup."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_plugin.checkpoint.deepspec import load_drafter, save_drafter
from dspark_plugin.errors import DSparkCheckpointError, DSparkConfigError, DSparkError
from dspark_plugin.reference.runner import ReferenceRunner
from tiny import save_tiny_target, tiny_drafter, tiny_target


@pytest.fixture()
def good(tmp_path):
    target = tiny_target()
    save_drafter(tiny_drafter(target, "vanilla"), tmp_path / "d")
    return target, tmp_path / "d"


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    t = load_file(path / "model.safetensors")
    fn(t)
    save_file(t, str(path / "model.safetensors"))


def expect(exc_type, path_part, key, fn):
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert path_part in msg and f"'{key}'" in msg, msg
    assert "\n" not in msg
    return msg


def test_missing_tensor(good):
    target, d = good
    edit_tensors(d, lambda t: t.pop("layers.0.mlp.up_proj.weight"))
    expect(DSparkCheckpointError, "model.safetensors", "layers.0.mlp.up_proj.weight", lambda: load_drafter(d, target))


def test_wrong_shape(good):
    target, d = good
    edit_tensors(d, lambda t: t.__setitem__("fc.weight", torch.zeros(32, 7)))
    msg = expect(DSparkCheckpointError, "model.safetensors", "fc.weight", lambda: load_drafter(d, target))
    assert "(32, 7)" in msg


def test_unexpected_tensor(good):
    target, d = good
    edit_tensors(d, lambda t: t.__setitem__("markov_head.joint_proj.weight", torch.zeros(3, 3)))
    expect(DSparkCheckpointError, "model.safetensors", "markov_head.joint_proj.weight", lambda: load_drafter(d, target))


def test_vocab_mismatch(good):
    _, d = good
    other = tiny_target(vocab=80)
    msg = expect(DSparkConfigError, "config.json", "vocab_size", lambda: load_drafter(d, other))
    assert "96" in msg and "80" in msg


def test_hidden_size_mismatch(good):
    _, d = good
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2))
    expect(DSparkConfigError, "config.json", "hidden_size", lambda: load_drafter(d, other))


@pytest.mark.parametrize("key,value,needle", [
    ("markov_head_type", "lstm", "vanilla, gated, rnn"),
    ("block_size", 0, ">= 1"),
    ("block_size", None, "missing"),
    ("target_layer_ids", [1, 99], "out of range"),
    ("mask_token_id", 10_000, "outside vocab"),
    ("enable_confidence_head", "yes", "true or false"),
])
def test_bad_config_keys(good, key, value, needle):
    target, d = good
    edit_config(d, **{key: value})
    msg = expect(DSparkConfigError, "config.json", key, lambda: load_drafter(d, target))
    assert needle in msg


def test_nonexistent_directory(tmp_path):
    expect(DSparkConfigError, "nope", "<directory>", lambda: load_drafter(tmp_path / "nope"))


def test_pickle_only_directory_is_refused(good):
    _, d = good
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    msg = expect(DSparkCheckpointError, str(d), "<weights>", lambda: load_drafter(d))
    assert "pickle" in msg


def test_corrupt_safetensors(good):
    target, d = good
    (d / "model.safetensors").write_bytes(b"\x00" * 20)
    expect(DSparkCheckpointError, "model.safetensors", "<file>", lambda: load_drafter(d, target))


def test_gamma_larger_than_block(good):
    target, d = good
    with pytest.raises(ValueError, match="gamma=9"):
        ReferenceRunner(target, load_drafter(d, target), gamma=9)


def test_cli_reports_one_line(good, tmp_path):
    _, d = good
    save_tiny_target(tmp_path / "t")
    edit_config(d, markov_head_type="lstm")
    proc = subprocess.run([sys.executable, "-m", "dspark_plugin.cli", "generate", "--target", str(tmp_path / "t"),
                           "--drafter", str(d), "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "config.json" in last and "'markov_head_type'" in last


def test_errors_are_dspark_errors():
    assert issubclass(DSparkConfigError, DSparkError) and issubclass(DSparkCheckpointError, DSparkError)
