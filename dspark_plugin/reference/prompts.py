"""Prompt sets (JSONL) and chat formatting, shared by eval, data generation and calibration."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspark_plugin.errors import DSparkError


def prompt_text(row: dict[str, Any]) -> str | None:
    """First-turn text of a row: `turns[0]`, `prompt`, `question`, or `instruction` (+ first input)."""
    turns = row.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    for key in ("prompt", "question"):
        if isinstance(row.get(key), str):
            return row[key]
    if isinstance(row.get("instruction"), str):
        text = row["instruction"]
        instances = row.get("instances")
        if isinstance(instances, list) and instances and isinstance(instances[0], dict):
            extra = instances[0].get("input") or ""
            if isinstance(extra, str) and extra.strip():
                text = f"{text}\n\n{extra}"
        return text
    return None


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DSparkError(f"{path}: prompt file not found")
    prompts = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DSparkError(f"{path}:{lineno}: not valid JSON ({e})") from None
            text = prompt_text(row) if isinstance(row, dict) else None
            if text is None:
                raise DSparkError(f"{path}:{lineno}: no prompt field (turns[0], prompt, question or instruction)")
            prompts.append(text)
            if limit is not None and len(prompts) >= limit:
                break
    return prompts


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a user turn, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text)["input_ids"]
