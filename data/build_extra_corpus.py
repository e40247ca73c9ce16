"""Rebuild data/corpus/kjv_austen.jsonl.xz, the second offline corpus behind `--source embedded_plus`.

Two public-domain texts that Debian packages (and so any Debian mirror) carry, turned into the same one-JSON-
object-per-document format as the Shakespeare corpus (`{"id", "split", "text"}`):

* The King James Bible, from Debian's `bible-kjv` (the `bible` program) and `bible-kjv-text` (its text
  database `bible.data`), dumped verse by verse with `bible -f -d bible.data Gen1:1-Rev22:21`; one document per
  book (verses one per line without their references, a blank line between chapters).
* Jane Austen's six novels, from Debian's `r-cran-janeaustenr` (the R package's lazy-load data base
  `data/Rdata.rdx|rdb`, read with the pure-Python `rdata` package); one document per novel.

The shipped file is what `embedded_plus` reads; this script only documents, reproducibly, how it was made. It
needs the two inputs on disk and `pip install rdata` (a build-time tool, not a requirement of the project):

    apt-get download bible-kjv bible-kjv-text r-cran-janeaustenr
    for p in *.deb; do dpkg -x "$p" ex; done
    ex/usr/bin/bible -f -d ex/usr/lib/bible.data Gen1:1-Rev22:21 > kjv.txt
    python -m data.build_extra_corpus --kjv kjv.txt --austen ex/usr/lib/R/site-library/janeaustenr/data/Rdata

Validation split (held out, fixed here so every machine holds out the same text): the last KJV_VAL_BOOKS books of
the Bible (Hebrews to Revelation) and the last novel in file order, Sense and Sensibility.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import re
import zlib
from pathlib import Path

from data.build_corpus import hold_out_tail, write_corpus

EXTRA_CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "kjv_austen.jsonl.xz"
KJV_VAL_BOOKS = 9  # Hebrews, James, 1 Peter, 2 Peter, 1 John, 2 John, 3 John, Jude, Revelation
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def read_kjv(dump: Path) -> list[dict]:
    """Books of the `bible -f` dump, in canonical order: {"id": book abbreviation, "text"}."""
    books: list[dict] = []
    chapter = None
    for line in dump.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m is None:
            if not books:
                raise ValueError(f"{dump}: line {line[:60]!r} is not a verse ('Ge1:1 In the beginning ...')")
            books[-1]["lines"][-1] += " " + line.strip()  # a verse wrapped onto the next line
            continue
        book, ch, _, text = m.groups()
        if not books or books[-1]["id"] != book:
            books.append({"id": book, "lines": []})
            chapter = None
        if ch != chapter and books[-1]["lines"]:
            books[-1]["lines"].append("")  # a blank line between chapters
        chapter = ch
        books[-1]["lines"].append(text.strip())
    if len(books) != 66:
        raise ValueError(f"{dump}: found {len(books)} books, expected the 66 of the KJV (Gen1:1-Rev22:21)")
    return [{"id": f"kjv_{b['id'].lower()}", "text": "\n".join(b["lines"]) + "\n"} for b in books]


def _lazyload_object(rdb: bytes, offset: int, length: int) -> bytes:
    """One serialized object of an R lazy-load data base: a 4-byte length, then zlib (or a type byte + bz2/xz)."""
    blob = rdb[offset : offset + length]
    kind = blob[4:5]
    if kind == b"Z":
        return lzma.decompress(blob[5:])
    if kind == b"2":
        return bz2.decompress(blob[5:])
    if kind == b"0":
        return blob[5:]
    return zlib.decompress(blob[4:])


def read_austen(rdata_base: Path) -> list[dict]:
    """The six novels of janeaustenr's data base (`<base>.rdx` + `<base>.rdb`), in AUSTEN_NOVELS order."""
    import rdata  # lazy: optional, needed only to rebuild this corpus

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdata_base.with_suffix(".rdx").read_bytes())))
    rdb = rdata_base.with_suffix(".rdb").read_bytes()
    variables = {str(k): v for k, v in index["variables"].items()}
    missing = [n for n in AUSTEN_NOVELS if n not in variables]
    if missing:
        raise ValueError(f"{rdata_base}: no {missing} in the data base; is this janeaustenr's data/Rdata?")
    novels = []
    for name in AUSTEN_NOVELS:
        offset, length = (int(x) for x in variables[name])
        lines = rdata.conversion.convert(rdata.parser.parse_data(_lazyload_object(rdb, offset, length)))
        novels.append({"id": f"austen_{name}", "text": "\n".join(str(x) for x in lines).strip("\n") + "\n"})
    return novels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kjv", type=Path, required=True, help="the `bible -f Gen1:1-Rev22:21` dump")
    parser.add_argument("--austen", type=Path, required=True, help="janeaustenr's data/Rdata (without .rdx/.rdb)")
    parser.add_argument("--out", type=Path, default=EXTRA_CORPUS_FILE)
    args = parser.parse_args()
    books = hold_out_tail(read_kjv(args.kjv), KJV_VAL_BOOKS)
    novels = hold_out_tail(read_austen(args.austen), 1)
    chars = write_corpus(books + novels, args.out)
    print(f"wrote {args.out}: {len(books)} books + {len(novels)} novels, {chars['train']:,} train / {chars['val']:,} "
          f"val characters, {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
