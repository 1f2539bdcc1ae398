"""The plugin's monkey-patches of vLLM, one file each, and the index that installs them.

Each file says what it replaces and in which process, why, the upstream diff in `patches/` that
makes it unnecessary, when to delete it, and its scope; `applies()` checks the installed source
still has the shape (or the bug) the patch was written against, so a fixed vLLM is left alone;
`install()` goes through `dspark_plugin.patching.replace`, which refuses to patch one attribute twice.
`DSPARK_DISABLE_PATCHES=a,b` switches patches off by name; the server logs one line saying which
are on, off or not needed. `plugin.register()` calls `install_all()` in every process vLLM starts.

| name                       | replaces (under `vllm.`)                            | process     | scope          |
|----------------------------|-----------------------------------------------------|-------------|----------------|
| aot_cache_load             | compilation.decorators._try_load_aot_compiled_fn    | workers     | every server   |
| cpu_sampling_expand        | v1.sample.rejection_sampler.expand_batch_to_tokens  | workers     | every server   |
| cpu_seeded_chunked_prefill | GPUModelRunner._sample, ._bookkeeping_sync          | workers     | every server   |
| min_tokens_bonus           | v1.sample.sampler.Sampler.apply_logits_processors   | workers     | every server   |
| v1_dspark_method           | VllmConfig._get_v1_model_runner_unsupported_features| front end   | every server,  |
|                            | GPUModelRunner.__init__                             | workers     | acts on DSpark |
| plain_steps_without_drafts | GPUModelRunner._prepare_inputs                      | workers     | DSpark only    |
| drafts_with_output         | GPUModelRunner.sample_tokens                        | workers     | DSpark only    |
|                            | Scheduler.update_from_output, EngineCore.post_step  | engine core | every server,  |
|                            |                                                     |             | pass-through   |

("DSpark only": the scope "DSpark configs only" of the patch's docstring.)

How "DSpark configs only" works. A patch's parts named in its `RUNNER_PARTS_FOR_DSPARK` are not
installed at registration (no process knows its config then): `install_all()` only arms them, and
`install_for_dspark()` installs them, once per process, when `v1_dspark_method`'s
`GPUModelRunner.__init__` wrapper (or, with vLLM's V1 proposer registry, the registered factory)
constructs a runner for a DSpark config. A server without DSpark never has them; their wrappers
still check `dspark_config.serves()` on every call. The engine-core part of `drafts_with_output`
is the exception, installed at registration, a pass-through unless a step's output carries drafts
(which only the worker part, DSpark runners only, attaches). The engine core sees its `VllmConfig`
first in `EngineCore.__init__`, which itself calls `load_general_plugins()`: a wrapper on it,
installed by that very call, misses a spawned engine core's own construction. A hook further in
(the scheduler's constructor) would be one more private signature wrapped in every server, and if
it ever missed, a DSpark worker's drafts would be lost (the fallback `take_draft_token_ids` finds
them taken); the pass-through costs one attribute read and write per step.

Switching off `v1_dspark_method` means DSpark is not enabled on Model Runner V1 (vLLM refuses it
as without the plugin), so the DSpark-only parts are never installed either.
"""
from __future__ import annotations

import importlib
from typing import Any

from vllm.logger import init_logger

from dspark_plugin.patching import disabled_patches

logger = init_logger("vllm.dspark_plugin.patches")

INDEX: tuple[str, ...] = ("aot_cache_load", "cpu_sampling_expand", "cpu_seeded_chunked_prefill", "min_tokens_bonus",
                          "v1_dspark_method", "plain_steps_without_drafts", "drafts_with_output")
_installed: dict[str, bool] = {}
_dspark_parts: dict[str, tuple[str, ...]] = {}   # armed DSpark-only parts, patch name -> parts
_dspark_done: set[str] = set()                   # patches whose DSpark-only parts this process installed


def module(name: str) -> Any:
    """The module of patch `name` (one of INDEX)."""
    return importlib.import_module(f"dspark_plugin.vllm.patches.{name}")


def install_all() -> dict[str, bool]:
    """Install every patch that applies and is not switched off, once per process: name -> active.

    A DSpark-only part (a name in the module's `RUNNER_PARTS_FOR_DSPARK`) is armed here and installed by
    `install_for_dspark()`; it counts as active when armed, and only while `v1_dspark_method`
    (its hook) is active."""
    if _installed:
        return dict(_installed)
    off = disabled_patches(INDEX)
    for name in INDEX:
        patch = module(name)
        active = name not in off and patch.applies()
        runner_parts = tuple(getattr(patch, "RUNNER_PARTS_FOR_DSPARK", ()))
        if active and runner_parts and not _installed.get("v1_dspark_method"):
            active = False   # no DSpark runner is ever constructed: nothing to install them from
        if active:
            if runner_parts:
                for part in patch.PARTS:
                    if part not in runner_parts:
                        patch.install(part)
                _dspark_parts[name] = runner_parts
            else:
                patch.install()
        _installed[name] = active
    logger.info("dspark-plugin patches: %s", ", ".join(
        f"{n} {_state(n, a, off)}" for n, a in _installed.items()))
    return dict(_installed)


def _state(name: str, active: bool, off: frozenset[str]) -> str:
    if active:
        return "on (DSpark runners)" if name in _dspark_parts else "on"
    return "off (DSPARK_DISABLE_PATCHES)" if name in off else "not needed"


def install_for_dspark() -> None:
    """Install the armed DSpark-only parts; called where a runner is constructed for a DSpark config.

    Once per process: later calls (another runner, another engine in the same process) do nothing."""
    for name, parts in _dspark_parts.items():
        if name in _dspark_done:
            continue
        _dspark_done.add(name)
        patch = module(name)
        for part in parts:
            patch.install(part)
