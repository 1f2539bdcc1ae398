"""Sequential temperature scaling of the confidence head (docs/algorithm.md §1.4).

The scheduler ranks draft positions by prefix survival a_k = prod_{i<=k} c_i, so what must be
calibrated is the cumulative product, not each c_k alone. For k = 1..gamma in turn we pick T_k
on a 1-D grid minimising the expected calibration error (ECE) of a'_k = a'_{k-1} * sigmoid(z_k / T_k)
against the observed survival, with T_1..T_{k-1} already fixed; c'_k = sigmoid(logit(c_k) / T_k).

Labels come from real decoding with the full block verified: for every drafted block and position
k, the probability that drafts 1..k are all accepted given the drafted tokens,
prod_{i<=k} acc_i with acc_i = min(1, p_t(x_i) / p_d(x_i)) when sampling and 1[x_i = argmax p_t]
when greedy. ECE uses these exact probabilities (same expectation as the 0/1 outcome, less
noise); AUC needs 0/1 outcomes, drawn from them with a fixed seed.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch

from dspark_plugin.decode.sampling import logits_to_probs
from dspark_plugin.errors import DSparkError
from dspark_plugin.reference.batched_runner import BatchedRunner, StepRecord

DEFAULT_BINS = 15
OBJECTIVES = ("ece", "nll")
DATA_KEYS = ("conf_logits", "accept_prob", "request")


def default_grid() -> torch.Tensor:
    """Log-spaced temperatures 1/20..20 (241 points), with T = 1 exactly on the grid."""
    grid = torch.exp(torch.linspace(-1.0, 1.0, 241, dtype=torch.float64) * math.log(20.0))
    grid[120] = 1.0
    return grid


def ece(pred: torch.Tensor, label: torch.Tensor, n_bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Expected calibration error with equal-width bins; pred/label [..., N] -> [...] (float64).

    ECE = sum_b (n_b / N) |mean pred_b - mean label_b| = sum_b |sum pred_b - sum label_b| / N.
    Vectorised over leading dimensions so a whole temperature grid is scored at once.
    """
    pred = pred.double()
    label = label.double().expand_as(pred)
    n = pred.shape[-1]
    if n == 0:
        return torch.zeros(pred.shape[:-1], dtype=torch.float64)
    lead = pred.shape[:-1]
    flat_pred = pred.reshape(-1, n)
    bins = (flat_pred * n_bins).long().clamp(0, n_bins - 1)
    offset = torch.arange(flat_pred.shape[0])[:, None] * n_bins
    diff = torch.zeros(flat_pred.shape[0] * n_bins, dtype=torch.float64)
    diff.index_add_(0, (bins + offset).reshape(-1), (flat_pred - label.reshape(-1, n)).reshape(-1))
    return diff.view(-1, n_bins).abs().sum(-1).view(lead) / n


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties get average ranks); NaN if one class is absent."""
    score, label = score.double().reshape(-1), label.bool().reshape(-1)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(score)
    sorted_scores = score[order]
    ranks = torch.empty_like(score)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    # Average ranks over ties.
    uniq, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    avg = first.double() + (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def calibrated_survival(conf_logits: torch.Tensor, temperatures: Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """a'_k = prod_{i<=k} sigmoid(z_i / T_i) (float64) for raw confidence logits [N, gamma]."""
    z = conf_logits.double()
    if temperatures is not None:
        z = z / torch.as_tensor(temperatures, dtype=torch.float64)[: z.shape[-1]]
    return torch.sigmoid(z).cumprod(-1)


def _nll(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of predictions [G, N] against (soft) labels [N] -> [G]."""
    p = pred.clamp(1e-12, 1 - 1e-12)
    y = label.double()
    return -(y * p.log() + (1 - y) * (1 - p).log()).mean(-1)


def fit_sequential_temperatures(
    conf_logits: torch.Tensor,
    survival_labels: torch.Tensor,
    grid: torch.Tensor | None = None,
    n_bins: int = DEFAULT_BINS,
    objective: str = "ece",
) -> list[float]:
    """T_1..T_gamma by sequential temperature scaling.

    conf_logits [N, gamma]: raw confidence-head logits z_k; survival_labels [N, gamma]: observed
    probability (or 0/1 outcome) that drafts 1..k were all accepted. On an exact tie the
    temperature closest to 1 wins, so a calibrated head keeps T = 1.
    objective: what each T_k minimises for the cumulative product: "ece" (the paper's binned
    calibration error) or "nll" (its log loss: smooth in T, so less fitting noise on few blocks).
    """
    if objective not in OBJECTIVES:
        raise DSparkError(f"calibration: unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if conf_logits.dim() != 2 or conf_logits.shape != survival_labels.shape:
        raise DSparkError(f"calibration: conf_logits {tuple(conf_logits.shape)} and labels "
                          f"{tuple(survival_labels.shape)} must both be [N, gamma]")
    if conf_logits.shape[0] == 0:
        raise DSparkError("calibration: no drafted blocks to fit on")
    grid = (default_grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64)).reshape(-1)
    z = conf_logits.double()
    labels = survival_labels.double()
    prev = torch.ones(z.shape[0], dtype=torch.float64)
    temps: list[float] = []
    closeness = grid.log().abs()
    for k in range(z.shape[1]):
        cand = prev[None, :] * torch.sigmoid(z[None, :, k] / grid[:, None])   # [G, N]
        scores = ece(cand, labels[:, k], n_bins) if objective == "ece" else _nll(cand, labels[:, k])
        best = scores.min()
        tied = (scores <= best + 1e-12).nonzero().squeeze(1)
        i = int(tied[closeness[tied].argmin()])
        temps.append(float(grid[i]))
        prev = cand[i]
    return temps


@dataclasses.dataclass
class CalibrationData:
    conf_logits: torch.Tensor       # [N, gamma] raw confidence logits of drafted blocks
    accept_prob: torch.Tensor       # [N, gamma] P(draft k accepted | drafted tokens, drafts < k accepted)
    request: torch.Tensor           # [N] which prompt each block came from (for held-out splits)

    @property
    def survival_labels(self) -> torch.Tensor:
        return self.accept_prob.double().cumprod(-1)

    def binary_survival(self, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(self.accept_prob.shape, generator=g, dtype=torch.float64)
        return (u < self.accept_prob.double()).long().cumprod(-1).bool()

    def select(self, mask: torch.Tensor) -> "CalibrationData":
        return CalibrationData(self.conf_logits[mask], self.accept_prob[mask], self.request[mask])


def position_report(data: CalibrationData, temperatures: Sequence[float], n_bins: int = DEFAULT_BINS,
                    seed: int = 0) -> list[dict]:
    """Per position k: ECE and AUC of the cumulative survival before (T = 1) and after calibration."""
    labels = data.survival_labels
    binary = data.binary_survival(seed)
    before = calibrated_survival(data.conf_logits, None)
    after = calibrated_survival(data.conf_logits, temperatures)
    rows = []
    for k in range(data.conf_logits.shape[1]):
        rows.append({
            "position": k + 1,
            "temperature": float(temperatures[k]),
            "observed_survival": float(labels[:, k].mean()),
            "predicted_before": float(before[:, k].mean()),
            "predicted_after": float(after[:, k].mean()),
            "ece_before": float(ece(before[:, k], labels[:, k], n_bins)),
            "ece_after": float(ece(after[:, k], labels[:, k], n_bins)),
            "auc_before": auc(before[:, k], binary[:, k]),
            "auc_after": auc(after[:, k], binary[:, k]),
        })
    return rows


def _logit(c: torch.Tensor) -> torch.Tensor:
    # sigmoid in float32 saturates at ~17; clamp so logit stays finite and ordered.
    c = c.double().clamp(1e-7, 1 - 1e-7)
    return torch.log(c) - torch.log1p(-c)


@torch.inference_mode()
def collect_calibration_data(
    target: torch.nn.Module,
    drafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    eos_token_ids: set[int] | None = None,
) -> CalibrationData:
    """Decode `prompts` with the full block verified and record every drafted block's raw
    confidences and per-position acceptance probabilities (see the module docstring)."""
    if drafter.confidence_head is None:
        raise DSparkError(f"{drafter.cfg.source}: key 'enable_confidence_head': drafter has no confidence head to calibrate")
    saved = drafter.confidence_temperatures
    drafter.confidence_temperatures = None  # raw logits: calibration must not fit on top of an old fit
    zs, accs, reqs = [], [], []
    greedy = temperature <= 0
    offset = 0

    def observe(step: StepRecord) -> None:
        block = step.block
        if block is None:
            return
        g = block.tokens.shape[1]
        logits = step.target_logits[:, :g]                 # full block verified: all g positions present
        ok = block.ok.cpu()
        x = block.tokens
        if greedy:
            acc = (logits.argmax(-1) == x).double()
        else:
            p_t = logits_to_probs(logits, temperature, top_k, top_p).gather(-1, x[..., None]).squeeze(-1)
            p_d = block.probs.gather(-1, x[..., None]).squeeze(-1)
            acc = (p_t.double() / p_d.double().clamp(min=1e-30)).clamp(max=1.0)
        zs.append(_logit(block.confidence.cpu())[ok])
        accs.append(acc.cpu()[ok])
        reqs.append((step.rows + offset)[ok])

    try:
        runner = BatchedRunner(target, drafter, scheduler="fixed")
        for start in range(0, len(prompts), batch_size):
            offset = start
            runner.generate(prompts[start:start + batch_size], max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed + start, eos_token_ids=eos_token_ids, observer=observe)
    finally:
        drafter.confidence_temperatures = saved
    if not zs:
        raise DSparkError("calibration: decoding produced no drafted blocks (prompts too short / max_new_tokens <= 1?)")
    return CalibrationData(torch.cat(zs), torch.cat(accs), torch.cat(reqs))


def split_by_request(data: CalibrationData, holdout: float, seed: int = 0) -> tuple[CalibrationData, CalibrationData]:
    """(fit, held-out): whole requests go to one side, so held-out blocks share no context with fit ones."""
    reqs = torch.unique(data.request)
    if holdout <= 0 or len(reqs) < 2:
        return data, data
    g = torch.Generator().manual_seed(seed)
    perm = reqs[torch.randperm(len(reqs), generator=g)]
    n_hold = min(len(reqs) - 1, max(1, round(holdout * len(reqs))))
    held = torch.isin(data.request, perm[:n_hold])
    return data.select(~held), data.select(held)


def mean_ece(data: CalibrationData, temperatures: Sequence[float] | None, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of the cumulative survival averaged over the block positions."""
    pred, labels = calibrated_survival(data.conf_logits, temperatures), data.survival_labels
    return float(sum(ece(pred[:, k], labels[:, k], n_bins) for k in range(pred.shape[1])) / pred.shape[1])


def cross_validate(data: CalibrationData, holdout: float, splits: int, seed: int = 0, n_bins: int = DEFAULT_BINS,
                   objective: str = "ece") -> dict:
    """Held-out mean ECE before/after over `splits` random prompt splits (fit on one side, score
    the other): one split's ECE difference is within its own noise on a few thousand blocks; the
    mean over splits, and how many splits improve, say whether the scaling helps."""
    if splits < 1 or not 0 < holdout < 1:
        raise DSparkError(f"calibration: cross-validation needs splits >= 1 and 0 < holdout < 1 (got {splits}, {holdout})")
    before, after = [], []
    for i in range(splits):
        fit, held = split_by_request(data, holdout, seed + i)
        temps = fit_sequential_temperatures(fit.conf_logits, fit.survival_labels, n_bins=n_bins, objective=objective)
        before.append(mean_ece(held, None, n_bins))
        after.append(mean_ece(held, temps, n_bins))
    b, a = torch.tensor(before, dtype=torch.float64), torch.tensor(after, dtype=torch.float64)
    return {"splits": splits, "holdout": holdout, "objective": objective,
            "ece_before_mean": float(b.mean()), "ece_after_mean": float(a.mean()),
            "ece_before_sd": float(b.std()) if splits > 1 else 0.0, "ece_after_sd": float(a.std()) if splits > 1 else 0.0,
            "splits_improved": int((a < b).sum()), "ece_before": before, "ece_after": after}


def save_calibration_data(data: CalibrationData, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """The decoded blocks (safetensors), so a fit can be redone without decoding again; `metadata`
    (strings) records how they were decoded (sampling temperature, drafter, prompts)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"conf_logits": data.conf_logits.double().contiguous(), "accept_prob": data.accept_prob.double().contiguous(),
               "request": data.request.long().contiguous()}, str(path), metadata=metadata)
    return path


def load_calibration_data(path: str | Path) -> tuple[CalibrationData, dict[str, str]]:
    """(blocks, metadata) saved by `save_calibration_data`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DSparkError(f"{path}: calibration data file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            missing = [k for k in DATA_KEYS if k not in f.keys()]
            if missing:
                raise DSparkError(f"{path}: key {missing[0]!r}: missing from the calibration data")
            t = {k: f.get_tensor(k) for k in DATA_KEYS}
            meta = dict(f.metadata() or {})
    except DSparkError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file gets one clear error
        raise DSparkError(f"{path}: not a safetensors calibration data file ({e})") from None
    z, acc, req = t["conf_logits"], t["accept_prob"], t["request"]
    if z.dim() != 2 or acc.shape != z.shape:
        raise DSparkError(f"{path}: key 'accept_prob': shape {tuple(acc.shape)} must equal conf_logits {tuple(z.shape)} ([N, gamma])")
    if req.shape != (z.shape[0],):
        raise DSparkError(f"{path}: key 'request': shape {tuple(req.shape)} must be [{z.shape[0]}]")
    return CalibrationData(z, acc, req), meta
