"""Sampling is lossless: emitted tokens follow the target distribution exactly (chi-square tests).

Two levels: the verifier alone on Markov-chain toy models (many rows, strong test), and the whole
reference runner on a tiny real HF target with a small vocabulary.
"""
import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from dspark_plugin.decode.sampling import logits_to_probs, sample
from dspark_plugin.decode.verify import verify_rejection
from dspark_plugin.reference.runner import ReferenceRunner
from tiny import tiny_drafter, tiny_target


def chi2_pvalue(observed: dict, expected: dict, total: int) -> float:
    """Chi-square over cells, merging those with expected count < 5 into one."""
    obs, exp, rest_o, rest_e = [], [], 0.0, 0.0
    for cell, p in expected.items():
        e = p * total
        if e < 5:
            rest_o += observed.get(cell, 0)
            rest_e += e
        else:
            obs.append(observed.get(cell, 0))
            exp.append(e)
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    assert sum(observed.values()) == total
    exp = np.array(exp) * (sum(obs) / sum(exp))
    return float(chisquare(np.array(obs), exp).pvalue)


def markov_decode(pt, pd, x0, n_tokens, gamma, verify_len, gen):
    """Speculative decoding of B rows where target and drafter are Markov chains over V tokens."""
    b = x0.shape[0]
    out = [[] for _ in range(b)]
    last = x0.clone()
    while min(len(o) for o in out) < n_tokens:
        drafts, prev = [], last
        for _ in range(gamma):
            prev = sample(pd[prev], gen)
            drafts.append(prev)
        drafts = torch.stack(drafts, 1)
        draft_probs = pd[torch.cat([last[:, None], drafts[:, :-1]], 1)]
        target_probs = pt[torch.cat([last[:, None], drafts], 1)]
        vl = verify_len(b)
        res = verify_rejection(drafts, draft_probs, target_probs, vl, gen)
        for r in range(b):
            out[r].extend(res.emitted(r))
        last = torch.tensor([o[-1] for o in out])
    return [tuple(o[:n_tokens]) for o in out]


@pytest.mark.parametrize("verify", ["full", "short", "random", "zero"])
def test_rejection_sampling_matches_markov_target(verify):
    gen = torch.Generator().manual_seed(1234)
    v, gamma, b = 4, 3, 20000
    pt = torch.softmax(torch.randn(v, v, generator=gen) * 1.5, -1)
    pd = torch.softmax(torch.randn(v, v, generator=gen) * 1.5, -1)
    lens = {"full": lambda n: torch.full((n,), gamma), "short": lambda n: torch.full((n,), 1),
            "zero": lambda n: torch.zeros(n, dtype=torch.long),
            "random": lambda n: torch.randint(0, gamma + 1, (n,), generator=gen)}[verify]
    x0 = torch.zeros(b, dtype=torch.long)
    seqs = markov_decode(pt, pd, x0, 3, gamma, lens, gen)
    observed = {}
    for s in seqs:
        observed[s] = observed.get(s, 0) + 1
    expected = {s: float(pt[0, s[0]] * pt[s[0], s[1]] * pt[s[1], s[2]]) for s in itertools.product(range(v), repeat=3)}
    assert chi2_pvalue(observed, expected, b) > 0.01


def test_markov_check_detects_a_biased_verifier():
    """The same statistic must reject a wrong verifier (accept always), or the test above proves nothing."""
    gen = torch.Generator().manual_seed(99)
    v, b = 4, 20000
    pt = torch.softmax(torch.randn(v, v, generator=gen) * 1.5, -1)
    pd = torch.softmax(torch.randn(v, v, generator=gen) * 1.5, -1)
    x1 = sample(pd[torch.zeros(b, dtype=torch.long)], gen)  # "accept everything" = draft distribution
    observed = {}
    for t in x1.tolist():
        observed[(t,)] = observed.get((t,), 0) + 1
    expected = {(t,): float(pt[0, t]) for t in range(v)}
    assert chi2_pvalue(observed, expected, b) < 1e-6


def exact_joint(target, prompt, n, temperature, top_k):
    """Exact P(first n generated tokens) of the target by enumeration."""
    v = target.config.vocab_size
    probs = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            prefixes = list(probs)
            ids = torch.tensor([prompt + list(p) for p in prefixes])
            step = logits_to_probs(target(ids).logits[:, -1], temperature, top_k)
            probs = {p + (t,): probs[p] * float(step[i, t]) for i, p in enumerate(prefixes) for t in range(v)}
    return {k: p for k, p in probs.items() if p > 0}


@pytest.mark.parametrize("head,gamma,verify_len,temperature,top_k,lookup",
                         [("vanilla", 7, 2, 1.0, 0, False), ("rnn", 4, None, 0.8, 4, False),
                          ("vanilla", 7, None, 1.0, 0, True)])
def test_runner_sampling_matches_target(head, gamma, verify_len, temperature, top_k, lookup):
    target = tiny_target(vocab=6, layers=4, init=0.1)
    with torch.no_grad():  # tiny_target's sharp head makes this target ~deterministic: flatten it so
        target.get_output_embeddings().weight.mul_(0.25)  # every token has real mass and the test has power
    drafter = tiny_drafter(target, head, block_size=7, rank=4)
    fn = None if verify_len is None else (lambda block, g: verify_len)
    runner = ReferenceRunner(target, drafter, gamma=gamma, verify_len_fn=fn, context_lookup=lookup)
    prompt, trials = [2, 3, 4], 2500
    observed, accepted, copied = {}, 0, 0
    for seed in range(trials):
        res = runner.generate(prompt, max_new_tokens=3, temperature=temperature, top_k=top_k, seed=seed)
        key = tuple(res.tokens)
        observed[key] = observed.get(key, 0) + 1
        accepted += sum(res.accepted)
        copied += res.copied
        assert all(a <= (verify_len or gamma) for a in res.accepted)
    assert copied > 0 or not lookup, "no round verified a copy: the test would not exercise the lookup"
    assert accepted > trials // 4, "drafts were rarely accepted: the test would not exercise acceptance"
    assert len(observed) >= 20, "the target is near-deterministic: the chi-square would have no power"
    assert chi2_pvalue(observed, exact_joint(target, prompt, 3, temperature, top_k), trials) > 0.01


def test_per_row_generators_make_a_row_independent_of_its_batch():
    from dspark_plugin.decode.sampling import row_seeds, sample

    probs = torch.softmax(torch.randn(3, 50), -1)

    def draw(other_seed: int) -> list[int]:
        torch.manual_seed(other_seed)  # the global stream the unseeded rows use
        gens = [torch.Generator().manual_seed(11), None, torch.Generator().manual_seed(other_seed)]
        return [sample(probs, gens).tolist() for _ in range(5)]

    a, b = draw(1), draw(2)
    assert [r[0] for r in a] == [r[0] for r in b]   # row 0: its own seed, same draws
    assert [r[2] for r in a] != [r[2] for r in b]   # row 2: another seed, other draws
    s1 = row_seeds(3, [torch.Generator().manual_seed(5), None, None], torch.device("cpu"))
    s2 = row_seeds(3, [torch.Generator().manual_seed(5), None, None], torch.device("cpu"))
    assert s1[0] == s2[0] and 0 <= int(s1.min()) and int(s1.max()) < 2**32
    with pytest.raises(ValueError):
        sample(probs, [None, None])
