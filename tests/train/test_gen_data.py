"""gen-data on a tiny real HF target: chat template, batched left-padded greedy generation equal to
unbatched generation, resumability, prompt field layouts, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from dspark_plugin.cli import main
from dspark_plugin.errors import DSparkError
from dspark_plugin.train.gen_data import prompt_text, read_prompt_file
from tiny_target import build_tiny_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return build_tiny_target(tmp_path_factory.mktemp("tiny_target"))


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_layouts(tmp_path):
    assert prompt_text({"turns": ["t1", "t2"]}, "x") == "t1"
    assert prompt_text({"prompt": "p"}, "x") == "p"
    assert prompt_text({"question": "q", "answer": "a"}, "x") == "q"
    assert prompt_text({"instruction": "i", "instances": [{"input": "in", "output": "o"}]}, "x") == "i\n\nin"
    assert prompt_text({"instruction": "i", "instances": [{"input": "", "output": "o"}]}, "x") == "i"
    bad = _write(tmp_path / "bad.jsonl", [{"question": "ok"}, {"answer": "no prompt"}])
    with pytest.raises(DSparkError, match=r"bad.jsonl:2.*'question'"):
        read_prompt_file(bad)


def test_generate_resume_and_match_unbatched(target, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = _write(tmp_path / "a.jsonl", [{"question": f"how many apples has {w}"} for w in
                                      ["one", "two three four", "five", "six seven"]])
    b = _write(tmp_path / "b.jsonl", [{"instruction": "answer the question", "instances": [{"input": "what is one plus one"}]}])
    out = tmp_path / "data.jsonl"
    common = ["gen-data", "--target", str(target), "--prompts", str(a), str(b), "--out", str(out),
              "--max-new-tokens", "12", "--batch-size", "3"]
    assert main(common + ["--limit", "3"]) == 0
    first = [json.loads(l) for l in out.read_text().splitlines()]
    # interleaved: a[0], b[0], a[1]
    assert [r["source"].rsplit("/", 1)[1] for r in first] == ["a.jsonl:1", "b.jsonl:1", "a.jsonl:2"]
    assert main(common) == 0  # resumes: only the 2 missing prompts are generated
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 5 and rows[:3] == first
    assert len({r["prompt"] for r in rows}) == 5
    assert main(common) == 0
    assert len(out.read_text().splitlines()) == 5

    tok = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert r["prompt_ids"] == ids
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        # Left-padded batched greedy must equal unbatched greedy (a padding bug would shift tokens).
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=2, eos_token_id=2)[0, len(ids):].tolist()
        if 2 in ref:
            ref = ref[: ref.index(2) + 1]
        assert r["response_ids"] == ref
        assert r["finished"] == (ref[-1] == 2)
        assert 1 <= len(r["response_ids"]) <= 12


def test_sampling_and_missing_file(target, tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "what is two"}, {"prompt": "what is three"}])
    out = tmp_path / "s.jsonl"
    assert main(["gen-data", "--target", str(target), "--prompts", str(a), "--out", str(out),
                 "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert main(["gen-data", "--target", str(target), "--prompts", str(tmp_path / "nope.jsonl"),
                 "--out", str(out)]) == 2
