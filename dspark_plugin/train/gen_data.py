"""Regenerate training responses with the target itself (docs/algorithm.md §2: the drafter must learn the
target's own distribution, so dataset answers are replaced by the target's answers).

Output is JSONL, one line per prompt: {"prompt", "prompt_ids", "response_ids", "response",
"finished", "source"}. The file is appended to after every batch, so an interrupted run resumes by
skipping prompts whose text is already present.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from dspark_plugin.errors import DSparkError
from dspark_plugin.reference.prompts import prompt_text as row_prompt_text


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str  # "file:line", for tracing a sample back to its dataset


def prompt_text(record: dict, where: str) -> str:
    """The user turn of one dataset record (MT-Bench, plain, GSM8K or self-instruct layouts)."""
    text = row_prompt_text(record)
    if text is None:
        raise DSparkError(f"{where}: no prompt field (expected 'turns', 'prompt', 'question' or 'instruction')")
    return text


def read_prompt_file(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise DSparkError(f"{path}: prompt file not found")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DSparkError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DSparkError(f"{where}: expected a JSON object")
            prompts.append(Prompt(prompt_text(record, where), where))
    return prompts


def interleave(lists: list[list[Prompt]]) -> list[Prompt]:
    """Round-robin over the files, so a --limit or an early stop still gives a blend of domains."""
    out: list[Prompt] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def done_prompts(out_path: Path) -> set[str]:
    """Prompt texts already in the output; a torn last line (killed mid-write) is ignored."""
    if not out_path.exists():
        return set()
    done = set()
    with out_path.open(encoding="utf-8") as f:
        for line in f:
            try:
                done.add(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def batches(items: list[Prompt], size: int) -> Iterator[list[Prompt]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def trim_response(ids: list[int], eos_ids: set[int], pad_id: int | None) -> tuple[list[int], bool]:
    """Cut after the first EOS (kept: the drafter must learn to predict the end)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], True
    if pad_id is not None:
        while ids and ids[-1] == pad_id and pad_id not in eos_ids:
            ids = ids[:-1]
    return ids, False


def generate_dataset(
    target_dir: str | Path,
    prompt_files: Iterable[str | Path],
    out_path: str | Path,
    limit: int | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    max_prompt_tokens: int = 1024,
    seed: int = 0,
    progress: bool = True,
) -> int:
    """Generate responses for prompts not yet in out_path; returns how many lines were appended."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_path = Path(out_path)
    prompts = interleave([read_prompt_file(p) for p in prompt_files])
    if limit is not None:
        prompts = prompts[:limit]
    done = done_prompts(out_path)
    seen: set[str] = set()
    todo = []
    for p in prompts:  # also drops duplicate prompts inside the inputs
        if p.text not in done and p.text not in seen:
            todo.append(p)
            seen.add(p.text)
    if not todo:
        return 0

    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    if tokenizer.chat_template is None:
        raise DSparkError(f"{target_dir}: tokenizer has no chat template (key 'chat_template')")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    model.eval()
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    eos_ids.add(tokenizer.eos_token_id)
    torch.manual_seed(seed)

    appended = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="gen-data", unit="prompt", disable=not progress)
    new_tokens = 0
    with out_path.open("a", encoding="utf-8") as out:
        for batch in batches(todo, batch_size):
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True
                )
                for p in batch
            ]
            # The template already holds its special tokens; adding BOS again would shift the data.
            enc = tokenizer(texts, add_special_tokens=False)
            keep = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) <= max_prompt_tokens]
            if not keep:
                bar.update(len(batch))
                continue
            batch = [batch[i] for i in keep]
            prompt_ids = [enc["input_ids"][i] for i in keep]
            padded = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")
            kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=sorted(eos_ids))
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.inference_mode():
                seqs = model.generate(
                    input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], **kwargs
                )
            gen = seqs[:, padded["input_ids"].shape[1] :].tolist()
            for p, pids, rids in zip(batch, prompt_ids, gen):
                rids, finished = trim_response(rids, eos_ids, tokenizer.pad_token_id)
                new_tokens += len(rids)
                line = {
                    "prompt": p.text,
                    "prompt_ids": pids,
                    "response_ids": rids,
                    "response": tokenizer.decode(rids, skip_special_tokens=True),
                    "finished": finished,
                    "source": p.source,
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                appended += 1
            out.flush()
            bar.update(len(batch) + 0)
            bar.set_postfix(tok=new_tokens, tok_s=f"{new_tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}")
    bar.close()
    return appended
