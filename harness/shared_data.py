"""Where the workplace's prompt sets are: beside the checkout (../shared/data), else the usual mount.

One place for the lookup the benchmarks and tests share (LICENSES.md there says what each set is;
train only on the train/seed files).
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = next((d for d in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if d.is_dir()),
            Path("/work/shared/data"))
