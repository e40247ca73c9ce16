"""Reading the package corpus (`--source pkg_corpus`, built by data/build_package_corpus.py): where its parts
are, which of them a run uses, and their tokenization in parallel.

Where: `corpus_dir` (data.corpus_dir / --corpus-dir), else $SFA_CORPUS_DIR, else workspace/corpus/<name>/.
A part is looked for in that folder and in its sub-folders one level down (what `pack` writes: 00/, 01/, ...,
one per device call). Which: every val part, and train parts 0..train_parts-1 (null: all of them); each is
checked against index.json's sha256 before use. If the folder holds no index.json, the corpus is built there
first (that needs a Debian registry).

Tokenization: one task per part in a process pool (fork; all cores by default); each returns its documents'
tokens, `[eot] + ids` each. The results are put together in a fixed order, whatever the worker count, so the
shards are byte-identical: val first (the val parts' documents merged by their order key, so any prefix of val
mixes the domains like the whole), then the train parts in number order, documents in file order.
"""

from __future__ import annotations

import heapq
import json
import lzma
import multiprocessing
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from data.build_package_corpus import INDEX_FILE, MANIFEST, build, default_corpus_dir, order_key
from data.tokenizers import get_tokenizer, sha256_of_file

# The package corpora by source name: the manifest that defines each one.
PACKAGE_CORPORA = {"pkg_corpus": MANIFEST}


class CorpusPartsError(FileNotFoundError):
    """The parts a run asked for are not where it looked, or not the ones index.json describes."""


def is_package_corpus(source) -> bool:
    return isinstance(source, str) and source in PACKAGE_CORPORA


def find_index(corpus_dir: Path) -> Path | None:
    for candidate in [corpus_dir / INDEX_FILE, *sorted(corpus_dir.glob(f"*/{INDEX_FILE}"))]:
        if candidate.is_file():
            return candidate
    return None


def check_train_parts(train_parts) -> int | None:
    if train_parts is None:
        return None
    if isinstance(train_parts, bool) or not isinstance(train_parts, int) or train_parts < 1:
        raise ValueError(f"train_parts must be a positive whole number of parts (or null for all), got {train_parts!r}")
    return train_parts


def select_parts(name: str, corpus_dir: str | Path | None, train_parts: int | None, progress=None) -> tuple[dict, list[tuple[dict, Path]]]:
    """index.json and the (part, path) pairs to read: all val parts, then train parts 0..train_parts-1."""
    train_parts = check_train_parts(train_parts)
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir(name)
    index_file = find_index(corpus_dir)
    if index_file is None:
        build(corpus_dir, PACKAGE_CORPORA[name], progress=progress)
        index_file = corpus_dir / INDEX_FILE
    index = json.loads(index_file.read_text())
    wanted_manifest = sha256_of_file(PACKAGE_CORPORA[name])
    if index.get("manifest_sha256") != wanted_manifest:
        raise CorpusPartsError(
            f"{index_file} was built from another manifest (sha256 {index.get('manifest_sha256')}) than this "
            f"checkout's {PACKAGE_CORPORA[name]} ({wanted_manifest}); rebuild the corpus (delete {corpus_dir}) "
            "or carry parts built from this manifest"
        )
    val = [p for p in index["parts"] if p["split"] == "val"]
    train = [p for p in index["parts"] if p["split"] == "train"]
    if train_parts is not None and train_parts > len(train):
        raise CorpusPartsError(f"train_parts={train_parts}, but corpus {name} has only {len(train)} train parts (index {index_file})")
    wanted = val + train[: train_parts or len(train)]
    folders = [corpus_dir, *sorted(p for p in corpus_dir.iterdir() if p.is_dir() and not p.name.startswith("."))]
    found, missing = [], []
    for part in wanted:
        path = next((f / part["file"] for f in folders if (f / part["file"]).is_file()), None)
        (missing.append(part["file"]) if path is None else found.append((part, path)))
    if missing:
        have = sum(1 for p in train if any((f / p["file"]).is_file() for f in folders))
        hint = f"; or use the train parts that are here: train_parts={have}" if have and train_parts is None else ""
        raise CorpusPartsError(
            f"corpus_dir={corpus_dir} lacks {len(missing)} of the parts asked for ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): carry them (python -m data.build_package_corpus pack){hint}"
        )
    for part, path in found:
        if path.stat().st_size != part["bytes"] or sha256_of_file(path) != part["sha256"]:
            raise CorpusPartsError(f"{path} is not the part index.json describes (size or sha256 differ); copy it again")
    return index, found


def read_part(path: Path) -> list[dict]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _tokenize_part(args) -> list[tuple[str, np.ndarray]]:
    """(order key, [eot] + ids) for every document of one part, in file order."""
    path, tokenizer = args
    tok = get_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    docs = read_part(path)
    out = []
    for start in range(0, len(docs), 2000):  # bounded lists of Python ints
        batch = docs[start : start + 2000]
        for doc, ids in zip(batch, tok.encode_batch([d["text"] for d in batch])):
            out.append((order_key(doc["id"]), np.asarray([tok.eot_token] + ids, dtype=dtype)))
    return out


def token_chunks(parts: list[tuple[dict, Path]], tokenizer: str, workers: int | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """(split, tokens, documents) chunks in the fixed order described above; parts tokenized in parallel."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(parts)))
    tasks = [(path, tokenizer) for _, path in parts]
    splits = [part["split"] for part, _ in parts]
    if workers == 1:
        results = map(_tokenize_part, tasks)
        yield from _ordered(splits, results)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from _ordered(splits, pool.imap(_tokenize_part, tasks))


def _ordered(splits: list[str], results) -> Iterator[tuple[str, np.ndarray, int]]:
    """Val parts (which come first) merged by order key; then each train part as one chunk, in order."""
    val_lists = []
    for split, docs in zip(splits, results):
        if split == "val":
            val_lists.append(docs)
            if len(val_lists) == splits.count("val"):
                merged = [tokens for _, tokens in heapq.merge(*val_lists, key=lambda d: d[0])]
                yield "val", np.concatenate(merged) if merged else np.zeros(0, np.int64), len(merged)
        elif docs:
            yield split, np.concatenate([tokens for _, tokens in docs]), len(docs)
