"""`dspark eval`: acceptance (tau, per position), speed with and without DSpark, losslessness.

Target-only decoding runs in the same process, on the same prompts, right before DSpark on each
prompt, so the speed ratio is measured under the same machine load.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from tqdm import tqdm

from dspark_plugin.policy.step_rate import find_sps_curve, profile_hf_target
from dspark_plugin.policy.verify_planner import verify_len_fn
from dspark_plugin.reference.prompts import encode_prompt, read_prompts
from dspark_plugin.reference.runner import GenerationResult, ReferenceRunner


@dataclasses.dataclass
class DatasetReport:
    dataset: str
    prompts: int
    tau: float
    acceptance: list[float]         # P(draft k accepted | drafts < k accepted and k verified)
    cumulative_acceptance: list[float]  # P(at least k drafts accepted) per round
    tokens_per_s_dspark: float
    tokens_per_s_target: float
    speedup: float
    new_tokens: int
    rounds: int
    fallbacks: int
    greedy_identical: bool | None   # None when sampling
    mismatched_prompts: list[int]


def summarise(name: str, results: list[tuple[GenerationResult, GenerationResult]], gamma: int,
              greedy: bool) -> DatasetReport:
    spec = [s for _, s in results]
    rounds = sum(len(s.accepted) for s in spec)
    emitted = sum(sum(s.accepted) + len(s.accepted) for s in spec)
    reached = [0] * (gamma + 1)   # rounds that verified >= k drafts with drafts < k all accepted
    passed = [0] * (gamma + 1)    # rounds that accepted >= k drafts
    for s in spec:
        for acc, ver in zip(s.accepted, s.verified):
            for k in range(1, gamma + 1):
                if ver >= k and acc >= k - 1:
                    reached[k] += 1
                if acc >= k:
                    passed[k] += 1
    mismatched = [i for i, (t, s) in enumerate(results) if t.tokens != s.tokens] if greedy else []
    n_spec = sum(len(s.tokens) for s in spec)
    n_target = sum(len(t.tokens) for t, _ in results)
    tps_spec = n_spec / max(sum(s.seconds for s in spec), 1e-9)
    tps_target = n_target / max(sum(t.seconds for t, _ in results), 1e-9)
    return DatasetReport(
        dataset=name,
        prompts=len(results),
        tau=emitted / max(rounds, 1),
        acceptance=[passed[k] / reached[k] if reached[k] else 0.0 for k in range(1, gamma + 1)],
        cumulative_acceptance=[passed[k] / max(rounds, 1) for k in range(1, gamma + 1)],
        tokens_per_s_dspark=tps_spec,
        tokens_per_s_target=tps_target,
        speedup=tps_spec / max(tps_target, 1e-9),
        new_tokens=n_spec,
        rounds=rounds,
        fallbacks=sum(s.fallbacks for s in spec),
        greedy_identical=(not mismatched) if greedy else None,
        mismatched_prompts=mismatched,
    )


def build_verify_len_fn(mode: str, target, target_dir: str | Path, drafter_dir: str | Path | None = None,
                        sps_path: str | Path | None = None):
    """None for the fixed full block; otherwise the confidence scheduler at batch 1 with an SPS
    curve found beside the drafter / in the cache, or measured now (and cached) on the target."""
    if mode == "fixed":
        return None

    curve = find_sps_curve(target_dir, drafter_dir, sps_path)
    if curve is None:
        curve, _ = profile_hf_target(target_dir, model=target)
    return verify_len_fn(curve, mode)


def evaluate(target, tokenizer, drafter, data: str | Path, limit: int | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             gamma: int | None = None, eos: set[int] | None = None, progress: bool = True,
             verify_len_fn=None, context_lookup: bool = False) -> DatasetReport:
    prompts = read_prompts(data, limit)
    target_runner = ReferenceRunner(target)
    spec_runner = ReferenceRunner(target, drafter, gamma=gamma, verify_len_fn=verify_len_fn,
                                  context_lookup=context_lookup)
    results = []
    for i, text in enumerate(tqdm(prompts, desc=Path(data).stem, disable=not progress, unit="prompt")):
        ids = encode_prompt(tokenizer, text)
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed + i, eos_token_ids=eos)
        results.append((target_runner.generate(ids, **kw), spec_runner.generate(ids, **kw)))
    return summarise(Path(data).stem, results, spec_runner.gamma, greedy=temperature <= 0)
