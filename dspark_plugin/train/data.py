"""Training sequences: prompt + target-regenerated response, read from `dspark gen-data` JSONL."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dspark_plugin.errors import DSparkError


@dataclass(frozen=True)
class Sequence:
    ids: list[int]        # prompt_ids + response_ids
    prompt_len: int       # anchors live at positions >= prompt_len (response tokens)
    line: int             # 0-based line of the JSONL file, the cache key


def read_sequences(path: str | Path, max_len: int | None = None) -> list[Sequence]:
    """All usable lines of a gen-data file; a torn last line (writer still running) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DSparkError(f"{path}: training data file not found (make it with `dspark gen-data`)")
    out = []
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DSparkError(f"{path}:{i + 1}: not valid JSON") from None
        for key in ("prompt_ids", "response_ids"):
            if not isinstance(rec.get(key), list) or not all(isinstance(t, int) for t in rec[key]):
                raise DSparkError(f"{path}:{i + 1}: key '{key}' must be a list of token ids")
        ids = rec["prompt_ids"] + rec["response_ids"]
        if max_len is not None:
            ids = ids[:max_len]
        # An anchor at p needs at least the token p+1 after it.
        if len(ids) >= len(rec["prompt_ids"]) + 2:
            out.append(Sequence(ids=ids, prompt_len=len(rec["prompt_ids"]), line=i))
    return out
