"""Prompts the target writes itself (Magpie-style): open the chat template's user turn and sample.

A drafter must learn the target's distribution over the *kinds* of requests it will serve, and the
training files alone are narrow (GSM8K word problems and 175 self-instruct seeds). An instruct model
asked to continue an open user turn writes a plausible user request; a few fixed openings steer the
mix so chat, code, math and reasoning are all present. No evaluation set is read.
"""
from __future__ import annotations

import re
from typing import Any

# (topic, opening words of the user turn). "" lets the target choose the whole request.
OPENINGS: tuple[tuple[str, str], ...] = (
    ("chat", ""),
    ("chat", "Can you"),
    ("chat", "What is"),
    ("chat", "Explain"),
    ("chat", "Write a short"),
    ("chat", "How do I"),
    ("chat", "Give me"),
    ("code", "Write a Python function"),
    ("code", "Write a program"),
    ("code", "How do I implement"),
    ("code", "Fix this code:"),
    ("math", "Solve"),
    ("math", "Calculate"),
    ("math", "A store sells"),
    ("math", "What is the sum of"),
    ("reasoning", "If"),
    ("reasoning", "Why does"),
    ("reasoning", "Compare"),
)

_MARKER = "\x00DSPARK_USER_TURN\x00"


def user_turn_prefix(tokenizer: Any) -> str:
    """The chat text up to where a user message starts (system prompt and role header included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template (key 'chat_template')")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False)
    if _MARKER not in text:
        raise ValueError("chat template does not place the user message verbatim")
    return text[: text.index(_MARKER)]


def clean_request(opening: str, continuation: str, min_words: int = 4, max_chars: int = 600) -> str | None:
    """The user request, or None when it is too short, too long or looks like a conversation."""
    text = (f"{opening} {continuation.lstrip()}" if opening else continuation).strip()
    if len(text) > max_chars or len(text.split()) < min_words:
        return None
    # A continuation that runs into another role's turn or repeats itself is not a request.
    if re.search(r"<\|im_|assistant\s*:|\buser\s*:", text, re.IGNORECASE):
        return None
    words = text.lower().split()
    if len(set(words)) < 0.5 * len(words):
        return None
    return text


def normalized(text: str) -> str:
    """Key for deduplication: case, punctuation and spacing do not make a request new."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())
