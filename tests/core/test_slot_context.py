"""The drafter's context addressed by an engine's KV slots (model/slot_context.py): a block drafted from
it equals the block drafted from the reference runner's per-request ContextCache, for requests of
different lengths whose positions sit at scattered slots, written in any order and by several writers
(a prefix written by one request, read by another: a prefix-cache hit)."""
from __future__ import annotations

import pytest
import torch

from dspark_plugin.decode.draft import sequential_draft
from dspark_plugin.model.drafter import ContextCache
from dspark_plugin.model.slot_context import SlotContext
from tests.helpers.tiny import HIDDEN, VOCAB, tiny_drafter, tiny_target


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_slot_context_drafts_what_the_per_request_cache_drafts(head):
    target = tiny_target()
    drafter = tiny_drafter(target, head, layers=2)
    cfg = drafter.cfg
    torch.manual_seed(0)
    lengths = [5, 17, 11]
    taps = [torch.randn(n, len(cfg.target_layer_ids) * HIDDEN) for n in lengths]
    pool = SlotContext(cfg.num_hidden_layers, 64, cfg.num_key_value_heads, cfg.head_dim)
    # Request 2 shares request 1's first 9 positions (a prefix-cache hit): same slots, written once.
    order = torch.randperm(64)
    slots = [order[:5], order[5:22], torch.cat([order[5:14], order[22:24]])]
    taps[2][:9] = taps[1][:9]
    with torch.no_grad():
        for i in (1, 0):   # request 1 (with the shared prefix) first, then 0, in two chunks each
            half = lengths[i] // 2
            for lo, hi in ((0, half), (half, lengths[i])):
                kv = drafter.context_kv(taps[i][None, lo:hi], torch.arange(lo, hi)[None])
                pool.write(kv, slots[i][lo:hi])
        kv = drafter.context_kv(taps[2][None, 9:], torch.arange(9, 11)[None])   # only the suffix after the hit
        pool.write(kv, slots[2][9:])

        anchors = torch.tensor([7, 8, 9])
        h = drafter.block_hidden(pool.gather(slots), anchors, torch.tensor(lengths))
        batched = sequential_draft(drafter, h, anchors)
        for i, n in enumerate(lengths):
            cache = ContextCache(1)
            cache.append(drafter.context_kv(taps[i][None], torch.arange(n)[None]), torch.tensor([n]))
            ref_h = drafter.block_hidden(cache, anchors[i:i + 1], torch.tensor([n]))
            torch.testing.assert_close(h[i:i + 1], ref_h, rtol=1e-5, atol=1e-5)
            ref = sequential_draft(drafter, ref_h, anchors[i:i + 1])
            assert batched.tokens[i].tolist() == ref.tokens[0].tolist()
            torch.testing.assert_close(batched.confidence[i], ref.confidence[0], rtol=1e-5, atol=1e-5)
    assert VOCAB > int(batched.tokens.max())


def test_slot_ids_outside_the_pool_are_one_clear_error():
    pool = SlotContext(1, 8, 2, 4)
    kv = [(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))]
    with pytest.raises(IndexError, match="outside the pool of 8"):
        pool.write(kv, torch.tensor([8]))
