"""Text of a compressed SWORD Bible or commentary module (ModDrv zText / zCom / zCom4, CompressType ZIP, OSIS markup).

Layout, per testament (`ot`, `nt`), with b = book blocks or c = chapter blocks:
  <t>.?zs  blocks: (offset, compressed size, uncompressed size), 3 x uint32 little-endian each
  <t>.?zz  the zlib-compressed blocks
  <t>.?zv  one entry per verse slot (headings included): block number uint32, offset uint32, size uint16 (zText,
           zCom) or uint32 (zCom4); size 0 = no text there. A commentary links every verse of the range a note
           covers to the same entry: such repeats are read once.
One document per block (a book, or a chapter for chapter-blocked modules), its entries in order, one per line,
OSIS markup removed (notes dropped; line, paragraph and title elements end lines).
"""

from __future__ import annotations

import struct
import zlib
from html.parser import HTMLParser

from data.text_extract import tidy


class SwordError(ValueError):
    pass


class _OsisText(HTMLParser):
    _BREAK = {"lb", "l", "p", "div", "title", "lg", "item", "list", "br"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces, self.in_note = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "note":
            self.in_note += 1
        elif tag in self._BREAK:
            self.pieces.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag in self._BREAK:
            self.pieces.append("\n")

    def handle_endtag(self, tag):
        if tag == "note":
            self.in_note = max(0, self.in_note - 1)
        elif tag in self._BREAK:
            self.pieces.append("\n")

    def handle_data(self, data):
        if not self.in_note:
            self.pieces.append(data)


def osis_to_text(markup: str) -> str:
    parser = _OsisText()
    parser.feed(markup)
    parser.close()
    return "\n".join(" ".join(line.split()) for line in "".join(parser.pieces).split("\n"))


def _entries(index: bytes, blocks: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Verse entries; the entry width (10 or 12 bytes) is the one whose every entry fits inside its block."""
    for width, fmt in ((10, "<IIH"), (12, "<III")):
        if len(index) % width:
            continue
        entries = [struct.unpack_from(fmt, index, i) for i in range(0, len(index), width)]
        if all(size == 0 or (b < len(blocks) and off + size <= blocks[b][2]) for b, off, size in entries):
            return entries
    raise SwordError("verse index fits neither the 10- nor the 12-byte entry layout")


def sword_documents(files: dict[str, bytes], module_dir: str) -> list[tuple[str, str]]:
    """(id, text) per block of the module under module_dir (a path prefix inside `files`), ot before nt."""
    module_dir = module_dir.rstrip("/") + "/"
    docs = []
    for testament in ("ot", "nt"):
        names = {p[len(module_dir) :]: p for p in files if p.startswith(module_dir + testament + ".")}
        kind = next((n[len(testament) + 1] for n in names if n.endswith("zs")), None)
        if kind is None:
            continue
        blob = {ext: files[names[f"{testament}.{kind}{ext}"]] for ext in ("zs", "zv", "zz")}
        blocks = [struct.unpack_from("<III", blob["zs"], i) for i in range(0, len(blob["zs"]), 12)]
        if not blocks:
            continue
        cache: dict[int, bytes] = {}
        texts: dict[int, list[str]] = {}
        seen = set()
        for b, off, size in _entries(blob["zv"], blocks):
            if size == 0 or (b, off, size) in seen:  # commentaries link every verse of a range to one entry
                continue
            seen.add((b, off, size))
            if b not in cache:
                start, length, _ = blocks[b]
                cache[b] = zlib.decompress(blob["zz"][start : start + length])
            text = osis_to_text(cache[b][off : off + size].decode("utf-8", errors="replace")).strip()
            if text:
                texts.setdefault(b, []).append(text)
        for b in sorted(texts):
            docs.append((f"{module_dir.rstrip('/').rsplit('/', 1)[-1]}/{testament}/{b:04d}", tidy("\n".join(texts[b]))))
    if not docs:
        raise SwordError(f"no SWORD module data (ot/nt .?zs/.?zv/.?zz) under {module_dir}")
    return docs
