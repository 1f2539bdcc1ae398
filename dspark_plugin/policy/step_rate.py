"""Engine steps per second versus verified-token batch size B (the SPS curve of docs/algorithm.md §1.5).

The scheduler trades expected tokens against step cost, so it needs SPS(B) for the engine it runs
in. We measure it (time a step that verifies B tokens at a few B), smooth it so it is
non-increasing in B (isotonic regression, pool-adjacent-violators: a bigger batch never runs
more steps per second, and timing noise must not make the scheduler think it does), and cache it
in a JSON file keyed by target + device + dtype (+ thread count on CPU) so a restart reuses it.

Between measured points the step *time* 1/SPS is interpolated linearly (step cost is close to
affine in B); beyond the last point it is extrapolated with the last segment's slope, and below
the first point SPS is held constant.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from dspark_plugin import envs
from dspark_plugin.errors import DSparkError

CACHE_VERSION = 1
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def isotonic_non_increasing(y: Sequence[float], w: Sequence[float] | None = None) -> list[float]:
    """Weighted least-squares fit of y by a non-increasing sequence (pool adjacent violators)."""
    w = [1.0] * len(y) if w is None else [float(v) for v in w]
    blocks: list[list[float]] = []  # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([float(yi), wi, 1])
        # A non-increasing fit is violated when a block's mean rises above its predecessor's.
        while len(blocks) > 1 and blocks[-1][0] > blocks[-2][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for m, _, n in blocks:
        out.extend([m] * n)
    return out


@dataclass
class SPSCurve:
    """Monotone SPS curve: call it with B, or ask `table(lo, hi)` for SPS at B = lo..hi."""

    batch_sizes: list[int]
    sps: list[float]  # smoothed, non-increasing
    raw_sps: list[float] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.batch_sizes or len(self.batch_sizes) != len(self.sps):
            raise DSparkError("SPSCurve: batch_sizes and sps must be non-empty and of equal length")
        if any(b2 <= b1 for b1, b2 in zip(self.batch_sizes, self.batch_sizes[1:])) or self.batch_sizes[0] < 1:
            raise DSparkError(f"SPSCurve: batch_sizes must be strictly increasing positive ints, got {self.batch_sizes}")
        if any(not (s > 0 and s < float("inf")) for s in self.sps):
            raise DSparkError("SPSCurve: sps values must be finite and positive")
        if any(s2 > s1 for s1, s2 in zip(self.sps, self.sps[1:])):
            raise DSparkError("SPSCurve: sps must be non-increasing in B (use SPSCurve.from_measurements to smooth)")

    @classmethod
    def from_measurements(cls, batch_sizes: Iterable[int], sps: Iterable[float], weights: Iterable[float] | None = None, meta: dict | None = None) -> "SPSCurve":
        """Sort by B, merge duplicates, and smooth to a non-increasing curve."""
        ws = list(weights) if weights is not None else None
        acc: dict[int, list[float]] = {}  # B -> [sum of w * sps, sum of w]
        for i, (b, s) in enumerate(zip(batch_sizes, sps)):
            w = float(ws[i]) if ws is not None else 1.0
            a = acc.setdefault(int(b), [0.0, 0.0])
            a[0] += w * float(s)
            a[1] += w
        bs = sorted(acc)
        wsum = [acc[b][1] for b in bs]
        means = [acc[b][0] / acc[b][1] for b in bs]
        return cls(bs, isotonic_non_increasing(means, wsum), raw_sps=means, meta=dict(meta or {}))

    def _step_time(self, b: torch.Tensor) -> torch.Tensor:
        xs = torch.tensor(self.batch_sizes, dtype=torch.float64)
        ts = 1.0 / torch.tensor(self.sps, dtype=torch.float64)
        b = b.to(torch.float64).clamp(min=xs[0].item())
        if xs.numel() == 1:
            return ts.expand_as(b).clone()
        i = torch.searchsorted(xs, b, right=True).clamp(1, xs.numel() - 1) - 1
        x0, x1, t0, t1 = xs[i], xs[i + 1], ts[i], ts[i + 1]
        return t0 + (t1 - t0) * (b - x0) / (x1 - x0)

    def table(self, lo: int, hi: int) -> torch.Tensor:
        """SPS at B = lo..hi (float64 tensor of length hi - lo + 1)."""
        return 1.0 / self._step_time(torch.arange(lo, hi + 1))

    def __call__(self, b: int) -> float:
        return float(self.table(int(b), int(b))[0])

    def to_dict(self) -> dict:
        return {"batch_sizes": self.batch_sizes, "sps": self.sps, "raw_sps": self.raw_sps, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "SPSCurve":
        for key in ("batch_sizes", "sps"):
            if key not in d:
                raise DSparkError(f"{source}: key '{key}': missing from SPS curve")
        try:
            return cls([int(b) for b in d["batch_sizes"]], [float(s) for s in d["sps"]], [float(s) for s in d.get("raw_sps", [])], dict(d.get("meta", {})))
        except DSparkError as e:
            raise DSparkError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, key: str | None = None) -> "SPSCurve":
        """Read a curve from an SPS JSON file (as written by `save` / `dspark profile`).

        With several entries in the file, `key` (see `cache_key`) selects one.
        """
        entries = _read_cache(Path(path))
        if key is not None:
            if key not in entries:
                raise DSparkError(f"{path}: key '{key}': no SPS curve for this target/device/dtype")
            return cls.from_dict(entries[key], f"{path}[{key}]")
        if len(entries) != 1:
            raise DSparkError(f"{path}: key 'entries': holds {len(entries)} SPS curves; pass a key to choose")
        (k, d), = entries.items()
        return cls.from_dict(d, f"{path}[{k}]")

    def save(self, path: str | os.PathLike, key: str) -> None:
        """Add or replace this curve under `key` in the JSON file (other entries are kept)."""
        path = Path(path)
        entries = _read_cache(path) if path.exists() else {}
        entries[key] = self.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1))
        os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DSparkError(f"{path}: SPS file not found") from None
    except json.JSONDecodeError as e:
        raise DSparkError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise DSparkError(f"{path}: key 'entries': missing or not an object")
    if data.get("version") != CACHE_VERSION:
        raise DSparkError(f"{path}: key 'version': {data.get('version')!r}, expected {CACHE_VERSION}")
    return data["entries"]


def target_fingerprint(target_dir: str | os.PathLike) -> str:
    """Real path of the target plus a hash of its config.json and weight file sizes/mtimes."""
    p = Path(target_dir).resolve()
    h = hashlib.sha256()
    cfg = p / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(p.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{p}@{h.hexdigest()[:12]}"


def device_tag(device: str | torch.device) -> str:
    """Device plus what makes CPU timings differ (thread count)."""
    device = torch.device(device)
    if device.type == "cpu":
        return f"cpu:{torch.get_num_threads()}threads"
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(idx)}"
    return str(device)


def engine_device_tag(device: str | torch.device, engine: str = "reference") -> str:
    """`device_tag`, except for vLLM on CPU: its worker binds its own OpenMP threads (one per
    usable core), so the profiling process's torch thread count says nothing about the engine's;
    the machine's core count does, and both sides can compute it without starting an engine."""
    if engine == "vllm" and torch.device(device).type == "cpu":
        return f"cpu:{os.cpu_count()}cores"
    return device_tag(device)


def cache_key(target: str, device: str, dtype: str | torch.dtype, engine: str = "reference") -> str:
    return f"{engine}|{target}|{device}|{str(dtype).replace('torch.', '')}"


def default_cache_path() -> Path:
    root = envs.read(envs.CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "dspark")
    return Path(root) / "sps.json"


def measure_sps(
    step: Callable[[int], None],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 3,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    meta: dict | None = None,
) -> SPSCurve:
    """Time `step(B)` (one engine step verifying B tokens) and return the smoothed curve.

    The fastest of `repeats` timings per B is kept: interference from other processes (or a
    stray allocator / thread wake-up) only ever adds time, so the minimum is the stable estimate.
    """
    sync = sync or (lambda: None)
    bs, vals = [], []
    for b in sorted(set(int(x) for x in batch_sizes)):
        for _ in range(warmup):
            step(b)
        sync()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            step(b)
            sync()
            times.append(time.perf_counter() - t0)
        bs.append(b)
        vals.append(1.0 / max(min(times), 1e-9))
    return SPSCurve.from_measurements(bs, vals, meta={**(meta or {}), "repeats": repeats})


def load_or_measure(cache_path: str | os.PathLike, key: str, measure: Callable[[], SPSCurve],
                    force: bool = False) -> tuple[SPSCurve, bool]:
    """The cached curve under `key`, or a fresh measurement stored there. Returns (curve, from_cache)."""
    cache_path = Path(cache_path)
    if cache_path.exists() and not force:
        entries = _read_cache(cache_path)
        if key in entries:
            return SPSCurve.from_dict(entries[key], f"{cache_path}[{key}]"), True
    curve = measure()
    curve.meta.setdefault("key", key)
    curve.save(cache_path, key)
    return curve, False


def hf_verify_step(model: torch.nn.Module, context_len: int = 64, seed: int = 0) -> Callable[[int], None]:
    """A step function for `measure_sps`: one target forward verifying B tokens of one sequence
    on top of a cached context of `context_len` tokens (what a reference-runner verify pass costs).
    """
    from transformers import DynamicCache

    cfg = model.config
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, cfg.vocab_size, (1, context_len), generator=g).to(device)
    with torch.no_grad():
        base = model(input_ids=ctx, use_cache=True).past_key_values

    def step(b: int) -> None:
        ids = torch.randint(0, cfg.vocab_size, (1, b), generator=g).to(device)
        cache = DynamicCache()
        # Fresh copy of the context cache every step so the measured context length never grows.
        for layer_idx in range(len(base.layers)):
            cache.update(base.layers[layer_idx].keys.clone(), base.layers[layer_idx].values.clone(), layer_idx)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)

    return step


def profile_hf_target(
    target_dir: str | os.PathLike,
    cache_path: str | os.PathLike | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    repeats: int = 3,
    context_len: int = 64,
    model: torch.nn.Module | None = None,
    force: bool = False,
) -> tuple[SPSCurve, bool]:
    """SPS curve of an HF target for the reference runner, cached (see `load_or_measure`)."""
    target_dir = Path(target_dir)
    if not (target_dir / "config.json").exists():
        raise DSparkError(f"{target_dir}: key 'config.json': target directory has no config.json")
    key = cache_key(target_fingerprint(target_dir), device_tag(device), dtype)
    cache_path = Path(cache_path) if cache_path is not None else default_cache_path()

    def measure() -> SPSCurve:
        m = model
        if m is None:
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device).eval()
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
        meta = {"target": str(target_dir.resolve()), "device": device_tag(device), "dtype": str(dtype), "context_len": context_len, "engine": "reference"}
        return measure_sps(hf_verify_step(m, context_len), batch_sizes, repeats=repeats, sync=sync, meta=meta)

    return load_or_measure(cache_path, key, measure, force=force)


SPS_FILE_NAME = "dspark_sps.json"  # an SPS file placed in the drafter directory is found automatically


def find_sps_curve(
    target_dir: str | os.PathLike,
    drafter_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    engine: str = "reference",
) -> SPSCurve | None:
    """The SPS curve an engine should use, or None when none was profiled.

    Looked up in order: an explicit `path` (a flag; its only entry, or the one for this
    target/device/dtype), `<drafter_dir>/dspark_sps.json` (same rule), then the default cache
    (exact key only, since it holds curves of many targets).
    """
    key = cache_key(target_fingerprint(target_dir), engine_device_tag(device, engine), dtype, engine)
    candidates = [Path(path)] if path is not None else []
    if drafter_dir is not None and (Path(drafter_dir) / SPS_FILE_NAME).is_file():
        candidates.append(Path(drafter_dir) / SPS_FILE_NAME)
    for i, file in enumerate(candidates):
        entries = _read_cache(file)
        if key in entries:
            return SPSCurve.from_dict(entries[key], f"{file}[{key}]")
        if len(entries) == 1:
            (k, d), = entries.items()
            return SPSCurve.from_dict(d, f"{file}[{k}]")
        if i == 0 and path is not None:
            raise DSparkError(f"{file}: key '{key}': no SPS curve for this target/device/dtype among {len(entries)}")
    cache = default_cache_path()
    if cache.is_file():
        entries = _read_cache(cache)
        if key in entries:
            return SPSCurve.from_dict(entries[key], f"{cache}[{key}]")
    return None
