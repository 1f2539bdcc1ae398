"""Keep the generated SmolLM2 training data across machines: pack it into one committed xz archive,
unpack it into work_cache/ where drafters/gen_data_smollm2.sh and train_smollm2.sh expect it.

Generating the data costs about an hour of this CPU, and work_cache/ does not outlive a machine;
the archive holds only what the trainer and the resumable generator read (token ids, the prompt
text that is the generator's resume key, `finished`, `source`), not the decoded response text, so
the whole set is a few MB (drafters/data/README.md).

    python drafters/data_archive.py pack      # work_cache/ -> drafters/data/smollm2-135m-train-data.tar.xz
    python drafters/data_archive.py unpack    # the reverse; never overwrites a file that has rows
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ROOT / "drafters" / "data" / "smollm2-135m-train-data.tar.xz"
# Archive member -> where the generator writes it.
FILES = {
    "self_prompts.jsonl": ROOT / "work_cache" / "data" / "self_prompts.jsonl",
    "train_data.jsonl": ROOT / "work_cache" / "train_data.jsonl",
    "train_data_t1.jsonl": ROOT / "work_cache" / "train_data_t1.jsonl",
}
NEWLINE = b"\n"
KEEP = ("prompt", "prompt_ids", "response_ids", "finished", "source")


def slim(path: Path) -> bytes:
    """The file's whole lines without the decoded response text (a torn last line is left out)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        out.append(json.dumps({k: row[k] for k in KEEP if k in row}, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode() if out else b""


def pack(archive: Path) -> None:
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for name, path in FILES.items():
            if not path.is_file():
                continue
            data = slim(path)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            print(f"{name}: {data.count(NEWLINE)} rows")
    print(f"wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")


def unpack(archive: Path) -> None:
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar.getmembers():
            dest = FILES.get(member.name)
            if dest is None:
                raise SystemExit(f"{archive}: unexpected member {member.name!r}")
            if dest.is_file() and dest.stat().st_size > 0:
                print(f"{dest}: kept (already has rows)")
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()
            dest.write_bytes(data)
            print(f"{dest}: {data.count(NEWLINE)} rows")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("--archive", type=Path, default=ARCHIVE)
    args = p.parse_args(argv)
    if args.action == "pack":
        pack(args.archive)
    elif not args.archive.is_file():
        print(f"{args.archive}: no archive to unpack", file=sys.stderr)
        return 1
    else:
        unpack(args.archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
