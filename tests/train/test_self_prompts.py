"""Target-written requests (train/self_prompts.py): the open user turn and what is kept of a sample."""
from __future__ import annotations

from dspark_plugin.train.self_prompts import OPENINGS, clean_request, normalized, user_turn_prefix
from tiny import tiny_tokenizer


def test_user_turn_prefix_ends_where_the_user_message_starts():
    tok = tiny_tokenizer()
    prefix = user_turn_prefix(tok)
    full = tok.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False)
    assert full.startswith(prefix) and full[len(prefix):].startswith("hello there")


def test_clean_request_keeps_requests_and_drops_the_rest():
    assert clean_request("Write a Python function", "that reverses a list.") == \
        "Write a Python function that reverses a list."
    assert clean_request("", "  What is the tallest mountain on Earth?") == "What is the tallest mountain on Earth?"
    assert clean_request("Solve", "it") is None                                 # too short
    assert clean_request("", "x " * 400) is None                                # too long
    assert clean_request("Can you", "help me? assistant: sure, here it is") is None   # runs into a reply
    assert clean_request("", "the the the the the the the the the cat") is None  # repeats itself
    assert normalized("What's  the time?") == normalized("what s the TIME")


def test_openings_cover_every_domain():
    assert {topic for topic, _ in OPENINGS} == {"chat", "code", "math", "reasoning"}
