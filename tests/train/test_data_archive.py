"""drafters/data_archive.py: the generated training data survives a round trip through the committed
archive (token ids, prompt, finished, source; the decoded text is dropped), a torn last line is left
out, and unpacking never overwrites a file that already has rows."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from dspark_plugin.train.data import read_sequences

REPO = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("data_archive", REPO / "drafters" / "data_archive.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_round_trip_keeps_what_the_trainer_and_generator_read(tmp_path, monkeypatch):
    mod = _module()
    rows = [{"prompt": f"question {i}", "prompt_ids": [1, 2, i], "response_ids": [5, 6, 7, i],
             "response": "decoded text", "finished": i % 2 == 0, "source": f"f.jsonl:{i}"} for i in range(5)]
    src = {name: tmp_path / "src" / name for name in mod.FILES}
    src["train_data.jsonl"].parent.mkdir(parents=True)
    src["train_data.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "torn')
    src["self_prompts.jsonl"].write_text(json.dumps({"prompt": "write me a poem", "source": "self:chat"}) + "\n")
    monkeypatch.setattr(mod, "FILES", src)
    archive = tmp_path / "data.tar.xz"
    mod.pack(archive)

    dst = {name: tmp_path / "dst" / name for name in mod.FILES}
    dst["self_prompts.jsonl"].parent.mkdir(parents=True)
    dst["self_prompts.jsonl"].write_text('{"prompt": "kept"}\n')  # has rows: not overwritten
    monkeypatch.setattr(mod, "FILES", dst)
    assert mod.main(["unpack", "--archive", str(archive)]) == 0
    back = [json.loads(line) for line in dst["train_data.jsonl"].read_text().splitlines()]
    assert back == [{k: v for k, v in r.items() if k != "response"} for r in rows]
    assert dst["self_prompts.jsonl"].read_text() == '{"prompt": "kept"}\n'
    assert not dst["train_data_t1.jsonl"].exists()  # not in the archive: nothing written
    seqs = read_sequences(dst["train_data.jsonl"])
    assert [s.ids for s in seqs] == [r["prompt_ids"] + r["response_ids"] for r in rows]
    assert mod.main(["unpack", "--archive", str(tmp_path / "missing.tar.xz")]) == 1
