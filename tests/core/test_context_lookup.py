"""Context lookup (decode/context_lookup) and the per-request choice between copy and drafter
(policy/lookup_choice): what is found, what is chosen, and that sampling stays exact."""
import itertools

import numpy as np
import torch

from dspark_plugin.decode.context_lookup import Lookup, find_continuation
from dspark_plugin.decode.sampling import sample
from dspark_plugin.decode.verify import verify_rejection
from dspark_plugin.policy.lookup_choice import PRIOR_ACCEPT, LookupAcceptance, choose_drafts, expected_accepted
from test_lossless_sampling import chi2_pvalue


def test_no_match_and_too_short_histories_find_nothing():
    assert find_continuation(np.array([1, 2, 3, 4, 5]), 3) is None
    assert find_continuation(np.array([7, 7]), 3) is None       # the suffix is never its own match
    assert find_continuation(np.array([1, 2, 1, 2]), 0) is None


def test_the_longest_suffix_wins_and_the_continuation_follows_it():
    #             0  1  2  3  4  5  6  7  8  9 10 11
    h = np.array([5, 1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3])
    found = find_continuation(h, 2)
    assert found.ngram == 3 and found.tokens.tolist() == [9, 8]   # "1 2 3" at 1, not "2 3" at 6
    found = find_continuation(np.array([4, 2, 3, 6, 6, 2, 3]), 5, min_ngram=2, max_ngram=4)
    assert found.ngram == 2 and found.tokens.tolist() == [6, 6, 2, 3]   # cut at the end of the history


def test_the_latest_occurrence_with_a_full_continuation_is_copied():
    # A loop of period 3: the latest earlier "1 2" has one token after it before the suffix starts;
    # the turn before has the full k = 3.
    h = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2])
    found = find_continuation(h, 3)
    assert found.tokens.tolist() == [3, 1, 2]
    # Copying text: the most recent occurrence of the suffix, not the first.
    h = np.array([4, 5, 6, 4, 5, 8, 8, 8, 4, 5])
    assert find_continuation(h, 2).tokens.tolist() == [8, 8]


def test_acceptance_is_learned_per_position_from_verifications():
    acc = LookupAcceptance(block=4, max_ngram=4)
    assert np.allclose(acc.confidence(3, 4), PRIOR_ACCEPT)
    for _ in range(200):
        acc.observe(3, verified=4, accepted=1)   # first copied token accepted, the second rejected
    c = acc.confidence(3, 4)
    assert c[0] > 0.95 and c[1] < 0.1
    assert np.allclose(c[2:], PRIOR_ACCEPT)      # never reached: still the prior
    assert np.allclose(acc.confidence(2, 4), PRIOR_ACCEPT)   # another suffix length: its own counts


def test_greedy_rows_choose_by_expected_prefix_and_copies_are_one_hot():
    acc = LookupAcceptance(block=3)
    tokens = torch.tensor([[10, 11, 12], [20, 21, 22], [30, 31, 32]])
    conf = torch.tensor([[0.95, 0.95, 0.95], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    probs = torch.full((3, 3, 40), 1 / 40)
    copy = Lookup(tokens=np.array([7, 8]), ngram=3)
    chosen = choose_drafts(tokens, conf, probs, [copy, copy, None], acc, sampled=[False] * 3)
    assert chosen.copied == [None, (3, 2), None]          # row 0's drafter beats a 2-token copy; row 2 had none
    assert chosen.tokens[1].tolist() == [7, 8, 22] and chosen.tokens[0].tolist() == [10, 11, 12]
    assert torch.allclose(chosen.confidence[1], torch.tensor([PRIOR_ACCEPT, PRIOR_ACCEPT, 0.0]))  # nothing past the copy
    assert chosen.probs[1, 0, 7] == 1 and chosen.probs[1, 0].sum() == 1 and chosen.probs[1, 2, 0] == 1 / 40
    assert tokens[1].tolist() == [20, 21, 22]             # the inputs are not modified


def test_sampled_rows_compare_with_the_drafters_past_mean_not_their_own_drafts():
    acc = LookupAcceptance(block=3)
    tokens = torch.tensor([[10, 11, 12]])
    confident = torch.tensor([[0.99, 0.99, 0.99]])
    copy = [Lookup(tokens=np.array([7, 8, 9]), ngram=2)]
    assert choose_drafts(tokens, confident, None, copy, acc, sampled=[True]).copied == [(2, 3)]
    assert choose_drafts(tokens, confident, None, copy, acc, sampled=[False]).copied == [None]
    for _ in range(1000):   # a drafter whose blocks have been this good keeps sampled rows too
        acc.note_drafter([float(expected_accepted(confident)[0])])
    assert choose_drafts(tokens, confident, None, copy, acc, sampled=[True]).copied == [None]


def _decode(pt, pd, b, n_tokens, own_drafts_decide, gen):
    """Rows decode n_tokens from a Markov target; each step the drafter samples 3 drafts from pd with
    confidences that depend on its first draft, and a fixed copy [1, 1, 1] competes with them."""
    acc = LookupAcceptance(block=3)
    out = [[] for _ in range(b)]
    last = torch.zeros(b, dtype=torch.long)
    copy = Lookup(tokens=np.array([1, 1, 1]), ngram=2)
    while min(len(o) for o in out) < n_tokens:
        x1 = sample(pd[last], gen)
        x2 = sample(pd[x1], gen)
        x3 = sample(pd[x2], gen)
        drafts = torch.stack([x1, x2, x3], 1)
        probs = pd[torch.stack([last, x1, x2], 1)]
        good = (x1 == 0).double()
        conf = torch.stack([torch.full_like(good, 0.99), 0.01 + 0.98 * good, torch.full_like(good, 0.99)], 1)
        chosen = choose_drafts(drafts, conf, probs, [copy] * b, acc, sampled=[not own_drafts_decide] * b)
        target_probs = pt[torch.cat([last[:, None], chosen.tokens], 1)]
        res = verify_rejection(chosen.tokens, chosen.probs, target_probs, torch.full((b,), 3), gen)
        for r in range(b):
            out[r].extend(res.emitted(r))
        last = torch.tensor([o[-1] for o in out])
    return [tuple(o[:n_tokens]) for o in out]


def _joint_pvalue(own_drafts_decide: bool) -> float:
    gen = torch.Generator().manual_seed(7)
    v, b = 4, 20000
    pt = torch.softmax(torch.randn(v, v, generator=gen) * 1.5, -1)
    pd = torch.softmax(torch.randn(v, v, generator=gen) * 1.5, -1)
    seqs = _decode(pt, pd, b, 2, own_drafts_decide, gen)
    observed = {}
    for s in seqs:
        observed[s] = observed.get(s, 0) + 1
    expected = {s: float(pt[0, s[0]] * pt[s[0], s[1]]) for s in itertools.product(range(v), repeat=2)}
    return chi2_pvalue(observed, expected, b)


def test_sampling_with_copies_reproduces_the_target():
    assert _joint_pvalue(own_drafts_decide=False) > 0.01


def test_the_check_detects_a_choice_made_from_the_sampled_drafts():
    """Keeping the drafter's block only when its own drafts look good biases them: the statistic
    above must see it, or it proves nothing."""
    assert _joint_pvalue(own_drafts_decide=True) < 1e-6
