"""Plain SGLang serving on CPU through `dspark-sglang` (the launcher plus the plugin's CPU patches, loaded
by SGLang's scheduler through the `sglang.srt.plugins` entry point): a real server on 127.0.0.1
serves SmolLM2-135M-Instruct, and its greedy output ids equal Hugging Face transformers' exactly.

Slow (a server start is 60-100 s on the 2-core machine). Skips where SGLang is not installed, and
fails with one line where the plugin's entry point is not (the scheduler would not load it)."""
from __future__ import annotations

import json
import urllib.request

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
from harness.sglang_serving import free_port, launch, wait_healthy  # noqa: E402
from harness.vllm_testing import smollm2_target  # noqa: E402

PROMPT = "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 48


def generate(port: int, text: str, max_new_tokens: int) -> dict:
    body = json.dumps({"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                         "ignore_eos": True}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def hf_greedy_ids(model_dir, text: str, max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(text, return_tensors="pt")
    # An explicit attention mask: without one, transformers masks every prompt token equal to the pad
    # id, and SmolLM2's pad token is <|im_end|>, which chat prompts contain.
    out = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, enc.input_ids.shape[1]:].tolist()


@pytest.mark.slow
def test_plain_server_through_the_launcher_equals_hugging_face(tmp_path, one_thread):
    assert launcher.entry_point_installed(), (
        f"{launcher.ENTRY_POINT_GROUP}: dspark = {launcher.ENTRY_POINT} is not installed: pip install the package")
    target = smollm2_target()
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = launch(target, port, [], log)
    try:
        wait_healthy(port, proc)
        out = generate(port, PROMPT, NEW_TOKENS)
    finally:
        processes.stop_group(proc.pid)
        log.close()
    got = out["output_ids"]
    assert len(got) == NEW_TOKENS
    assert got == hf_greedy_ids(target, PROMPT, NEW_TOKENS)
