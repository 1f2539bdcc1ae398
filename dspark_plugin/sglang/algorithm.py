"""The plugin's speculative algorithm in SGLang's registry: `--speculative-algorithm PLUGIN_DSPARK`.

Why not SGLang's own name `DSPARK`. SGLang 0.5.23 resolves a name to a built-in member first
(`SpeculativeAlgorithm.from_string`), and `SpeculativeAlgorithm.register` refuses every built-in name
("reserved"). The only other ways in are an out-of-tree *platform* plugin (`sglang.srt.platforms`,
`get_speculative_worker_cls`), which means replacing the CPU device itself, or `HookRegistry`
hooks on `_handle_dspark` (which refuses `--device cpu`) and `create_worker`; both would serve our
worker under `is_dspark()`, which steers 63 call sites in 28 files of the scheduler, model runner,
KV-pool sizing and attention backends toward SGLang's native DSpark worker's data structures. So the
plugin registers one clear name of its own, `PLUGIN_DSPARK`, through the supported
`SpeculativeAlgorithm.register` (not `DSPARK_...`: the package reserves that prefix for its
environment switches, tests/core/test_envs.py); on CPU `dspark-sglang` turns the user's `--speculative-algorithm
DSPARK` into it (launcher.py), and where the native DSPARK serves (CUDA, NPU, XPU) nothing is renamed.

0.5.23's `CustomSpecAlgo` lacks two methods the scheduler calls on every algorithm
(`carries_draft_hidden_states()`, `create_future_map()`); `DSparkPluginAlgo` defines them.
"""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("sglang.dspark_plugin.algorithm")

ALGORITHM_NAME = "PLUGIN_DSPARK"
NATIVE_NAME = "DSPARK"
WORKER_CLASS = "dspark_plugin.sglang.worker:DSparkPluginWorker"


def _spec_class() -> type:
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class DSparkPluginAlgo(CustomSpecAlgo):
        """PLUGIN_DSPARK as SGLang's scheduler sees it: a plain outside algorithm (every `is_*()` False),
        synchronous (no overlap), with the two methods 0.5.23's base class forgot."""

        def carries_draft_hidden_states(self) -> bool:
            # Disaggregated prefill -> decode transfer of draft hidden states: EAGLE only.
            return False

        def create_future_map(self, device: Any, req_to_token_pool: Any, needs_cpu_seq_lens: bool = True,
                              needs_confidence_relay: bool = False) -> Any:
            from sglang.srt.managers.overlap_utils import FutureMap

            # What SpeculativeAlgorithm.create_future_map builds for the built-ins.
            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

        def handle_server_args(self, server_args: Any) -> None:
            """SGLang's own DSpark flags keep their meaning; what the plugin's worker needs is filled in
            where the user left it unset (SGLang records these writes as the algorithm's defaults)."""
            from dspark_plugin.config.drafter_config import DSparkConfig

            server_args.disable_overlap_schedule = True   # the worker runs on the synchronous V2 schema
            # The radix cache stays as the user set it: the drafter's context lives at SGLang's KV slots
            # (worker.py), so a prefix-cache hit brings the cached prefix's context along.
            if server_args.speculative_num_steps is None:
                server_args.speculative_num_steps = 1      # one draft pass per step, as native DSPARK
            if server_args.speculative_eagle_topk is None:
                server_args.speculative_eagle_topk = 1     # a chain, not a tree
            if server_args.speculative_num_draft_tokens is None:
                cfg = DSparkConfig.from_dir(server_args.speculative_draft_model_path)
                # Verified tokens per request and step: the anchor's successor (bonus) + gamma drafts.
                server_args.speculative_num_draft_tokens = cfg.num_drafts + 1

    return DSparkPluginAlgo


def validate_server_args(server_args: Any) -> None:
    """Refuse, in one line each, what the plugin's worker does not serve."""
    if not server_args.speculative_draft_model_path:
        raise ValueError(f"--speculative-algorithm {ALGORITHM_NAME} needs --speculative-draft-model-path "
                         "(a DSpark drafter directory)")
    if int(getattr(server_args, "tp_size", 1) or 1) != 1 or int(getattr(server_args, "pp_size", 1) or 1) != 1:
        raise ValueError(f"--speculative-algorithm {ALGORITHM_NAME} serves one rank only (tp_size = pp_size = 1)")


def _worker_factory(server_args: Any) -> type:
    """SGLang asks for the worker class when the scheduler starts (not at registration)."""
    import importlib

    module, _, name = WORKER_CLASS.partition(":")
    return getattr(importlib.import_module(module), name)


def is_registered() -> bool:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    try:
        SpeculativeAlgorithm.from_string(ALGORITHM_NAME)
    except ValueError:
        return False
    return True


def register_algorithm() -> bool:
    """Register PLUGIN_DSPARK once per process; False when it was registered already."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    if is_registered():
        return False
    SpeculativeAlgorithm.register(ALGORITHM_NAME, supports_overlap=False, validate_server_args=validate_server_args,
                                  spec_class=_spec_class())(_worker_factory)
    return True
