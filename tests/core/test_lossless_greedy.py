"""Greedy speculative output == target-only greedy output, token for token (the core guarantee)."""
import pytest
import torch

from dspark_plugin.reference.runner import ReferenceRunner
from tiny import tiny_drafter, tiny_target

PROMPTS = [[2 + p, 3 + (p * 7) % 50, 4 + (p * 13) % 60, 10 + p % 9] for p in range(20)]
TARGETS = {"llama-varied": dict(kind="llama", init=0.3), "qwen3-repetitive": dict(kind="qwen3", init=0.02)}


@pytest.fixture(scope="module", params=list(TARGETS))
def target_and_reference(request):
    target = tiny_target(**TARGETS[request.param])
    runner = ReferenceRunner(target)
    return target, [runner.generate(p, max_new_tokens=64).tokens for p in PROMPTS]


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn", "none"])
@pytest.mark.parametrize("gamma", [4, 7])
def test_greedy_equals_target(target_and_reference, head, gamma):
    target, reference = target_and_reference
    drafter = tiny_drafter(target, head, block_size=7)
    runner = ReferenceRunner(target, drafter, gamma=gamma)
    accepted = []
    for prompt, expected in zip(PROMPTS, reference):
        res = runner.generate(prompt, max_new_tokens=64)
        assert len(res.tokens) == 64
        assert res.tokens == expected, f"prompt {prompt}: speculative output diverged from target-only"
        assert res.fallbacks == 0
        assert all(0 <= a <= gamma for a in res.accepted)
        accepted += res.accepted
    # Rounds really were speculative: never more forwards than tokens, and some drafts accepted.
    assert max(accepted) >= 1


@pytest.mark.parametrize("head", ["vanilla", "none"])
def test_greedy_with_context_lookup_equals_target(target_and_reference, head):
    target, reference = target_and_reference
    runner = ReferenceRunner(target, tiny_drafter(target, head, block_size=7), context_lookup=True)
    copied = 0
    for prompt, expected in zip(PROMPTS, reference):
        res = runner.generate(prompt, max_new_tokens=64)
        assert res.tokens == expected, f"prompt {prompt}: speculative output with copies diverged from target-only"
        copied += res.copied
    assert copied > 0, "no round verified a copy: the test would not exercise the lookup"


def test_greedy_with_eos_stops_like_target():
    target = tiny_target(init=0.3)
    drafter = tiny_drafter(target, "rnn")
    for prompt in PROMPTS[:5]:
        ref = ReferenceRunner(target).generate(prompt, 64)
        eos = {ref.tokens[10]}  # some token the target emits: generation must stop at its first use
        a = ReferenceRunner(target).generate(prompt, 64, eos_token_ids=eos)
        b = ReferenceRunner(target, drafter, gamma=7).generate(prompt, 64, eos_token_ids=eos)
        assert a.tokens == b.tokens and a.tokens[-1] in eos and len(a.tokens) <= 11


def test_eos_accepted_mid_block_ends_the_request():
    """An EOS that arrives as an accepted draft (not as the last token of a round) must end
    generation: rounds after it would emit nothing the user sees yet still count in tau."""
    target = tiny_target("qwen3", init=0.3)
    drafter = tiny_drafter(target, "vanilla")
    found = 0
    for prompt in PROMPTS:
        free = ReferenceRunner(target, drafter, gamma=7).generate(prompt, 64)
        pos = 1  # tokens[0] comes from the prefill; round i then emits accepted[i] + 1 tokens
        for i, n_acc in enumerate(free.accepted):
            mid = [j for j in range(pos, pos + n_acc) if free.tokens[j] not in free.tokens[:j]]
            if mid:
                eos = {free.tokens[mid[0]]}
                spec = ReferenceRunner(target, drafter, gamma=7).generate(prompt, 64, eos_token_ids=eos)
                plain = ReferenceRunner(target).generate(prompt, 64, eos_token_ids=eos)
                assert spec.tokens == plain.tokens == free.tokens[: mid[0] + 1]
                assert spec.accepted == free.accepted[: i + 1]  # no round after the EOS
                found += 1
                break
            pos += n_acc + 1
    assert found >= 3, "too few accepted drafts to turn into an EOS: the test would not test anything"


def test_nan_drafter_falls_back_to_plain_decoding():
    target = tiny_target(init=0.3)
    drafter = tiny_drafter(target, "vanilla")
    with torch.no_grad():
        drafter.markov_head.markov_w2.weight[3, 0] = float("nan")
        drafter.markov_head.markov_w1.weight.fill_(1.0)
    ref = ReferenceRunner(target).generate(PROMPTS[0], 32)
    res = ReferenceRunner(target, drafter, gamma=7).generate(PROMPTS[0], 32)
    assert res.tokens == ref.tokens
    assert res.fallbacks == res.num_rounds > 0
