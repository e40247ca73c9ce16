"""Turn text into token shards plus meta.json (layout: data/format.py; guide: docs/data.md).

    python -m data.prepare --source embedded --tokenizer gpt2
    python -m data.prepare --source notes/ "books/**/*.txt" corpus.jsonl --tokenizer qwen --out /data/mine
    python -m data.prepare --source hf:HuggingFaceFW/fineweb:sample-10BT --tokenizer gpt2 --max-tokens 1e9
    python -m data.prepare --source pkg_corpus --corpus-dir /path/to/parts --train-parts 3

The default output folder is workspace/data/<source>-<tokenizer>/ under the repository root. Output is
written to a temporary folder and renamed into place, so a folder with meta.json is always complete.
`ensure_prepared` is what the training job calls: prepare once, reuse afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from data.build_package_corpus import CorpusBuildError
from data.format import FORMAT_VERSION, META_FILE, SPLITS, DataFormatError, read_meta, shard_name, token_dtype, write_meta
from data.package_corpus import PACKAGE_CORPORA, check_train_parts, is_package_corpus, select_parts, token_chunks
from data.sources import HF_PREFIX, Document, is_embedded, iter_documents
from data.tokenizers import check_tokenizer_name, get_tokenizer, sha256_of_file, tokenizer_file_sha256

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO_ROOT / "workspace" / "data"
DEFAULT_SHARD_TOKENS = 100_000_000
# Documents are tokenized in batches this large (in characters): big enough for the tokenizer's threads.
_BATCH_CHARS = 8_000_000


class ShardWriter:
    """Append token arrays to <split>_NNNNNN.bin files, starting a new shard every `shard_tokens` tokens.

    `name(split, index)` names the files; two writers fed the same lengths cut their files at the same
    places (how scripts/niah.py writes loss masks beside the token shards: data.format.mask_name)."""

    def __init__(self, out_dir: Path, split: str, dtype: str, shard_tokens: int, name=shard_name):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, np.dtype(dtype), shard_tokens
        self.name = name
        self.shards: list[dict] = []
        self.documents = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            chunk.astype(self.dtype, copy=False).tofile(self._file)
            self.shards[-1]["tokens"] += len(chunk)

    def _open_next(self) -> None:
        self.close()
        name = self.name(self.split, len(self.shards))
        self._file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}


def batched_by_chars(documents: Iterable[Document], max_chars: int) -> Iterable[list[Document]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def document_chunks(documents: Iterable[Document], tok) -> Iterable[tuple[str, np.ndarray, int]]:
    """(split, [eot] + ids, 1) per document, tokenized in batches (the tokenizer's threads share a batch)."""
    for batch in batched_by_chars(documents, _BATCH_CHARS):
        for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
            yield doc.split, np.asarray([tok.eot_token] + ids, dtype=np.int64), 1


def source_label(source: str | list[str]) -> str:
    return source if isinstance(source, str) else " ".join(source)


def data_dir_name(source: str | list[str], tokenizer: str, train_parts: int | None = None) -> str:
    """The folder name under the data root, keyed by source and tokenizer (and the package corpus's subset)."""
    sources = [source] if isinstance(source, str) else list(source)
    if is_package_corpus(source):
        key = source if train_parts is None else f"{source}-{train_parts}parts"
    elif is_embedded(sources):
        key = sources[0]
    elif len(sources) == 1 and sources[0].startswith(HF_PREFIX):
        key = "hf-" + re.sub(r"[^A-Za-z0-9._-]+", "_", sources[0][len(HF_PREFIX):]).strip("_")
    else:  # local paths: a short hash of what was named, resolved against the current directory
        named = json.dumps([str(Path(s).absolute()) for s in sources])
        key = "local-" + hashlib.sha1(named.encode()).hexdigest()[:12]
    return f"{key}-{tokenizer}"


def prepare_options(source, val_fraction, max_tokens, shard_tokens, hf_split, text_field, hf_data_files,
                    train_parts=None) -> dict:  # fmt: skip
    """The settings that change the output; recorded in meta.json and compared on reuse."""
    is_hf = isinstance(source, str) and source.startswith(HF_PREFIX)
    fixed_split = is_embedded(source) or is_package_corpus(source)
    package = {}
    if is_package_corpus(source):  # which parts, and which manifest defined them (not where the parts lie)
        package = {"train_parts": train_parts, "manifest_sha256": sha256_of_file(PACKAGE_CORPORA[source])}
    elif train_parts is not None:
        raise ValueError(f"train_parts={train_parts!r} applies only to the package corpora ({', '.join(PACKAGE_CORPORA)}), not to source {source_label(source)!r}")
    return {
        "val_fraction": None if fixed_split else float(val_fraction),
        "max_tokens": None if max_tokens is None else int(max_tokens),
        "shard_tokens": int(shard_tokens),
        "hf_split": hf_split if is_hf else None,
        "text_field": text_field if is_hf else None,
        "hf_data_files": hf_data_files if is_hf else None,
        **package,
    }


def prepare(
    source: str | list[str] = "embedded",
    tokenizer: str = "gpt2",
    out: str | Path | None = None,
    *,
    val_fraction: float = 0.05,
    max_tokens: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    hf_split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
    hf_data_files=None,
    corpus_dir: str | Path | None = None,
    train_parts: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Tokenize `source` into shards + meta.json under `out` (default: DEFAULT_ROOT/<source>-<tokenizer>).

    corpus_dir, train_parts, workers: the package corpora only (data/package_corpus.py)."""
    check_tokenizer_name(tokenizer)
    train_parts = check_train_parts(train_parts)
    if max_tokens is not None:  # configs may say 1e9 (a float); a fraction or a string is a mistake
        if not isinstance(max_tokens, (int, float)) or max_tokens < 1 or max_tokens != int(max_tokens):
            raise ValueError(f"max_tokens must be a positive whole number of tokens, got {max_tokens!r}")
        max_tokens = int(max_tokens)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    options = prepare_options(source, val_fraction, max_tokens, shard_tokens, hf_split, text_field, hf_data_files, train_parts)
    out = Path(out) if out is not None else DEFAULT_ROOT / data_dir_name(source, tokenizer, train_parts)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} already exists and is not empty; pass --overwrite or choose another --out")

    started = time.time()
    tok = get_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    corpus_meta = None
    if is_package_corpus(source):
        index, parts = select_parts(source, corpus_dir, train_parts, progress=progress)
        chunks = token_chunks(parts, tokenizer, workers)
        corpus_meta = {"manifest_sha256": index["manifest_sha256"], "train_parts": train_parts,
                       "parts": [part["file"] for part, _ in parts]}  # fmt: skip
    else:
        hf_options = dict(hf_split=hf_split, text_field=text_field, streaming=streaming, data_files=hf_data_files)
        is_hf = isinstance(source, str) and source.startswith(HF_PREFIX)
        documents = iter_documents(source, val_fraction=val_fraction, **(hf_options if is_hf else {}))
        chunks = document_chunks(documents, tok)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the renamed folder should read like any other
    try:
        writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        budget = max_tokens if max_tokens is not None else float("inf")
        bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, disable=None if progress is None else not progress)
        for split, tokens, n_docs in chunks:
            if len(tokens) > budget:  # cut exactly at the cap; a document cut short still counts
                tokens = tokens[: int(budget)]
                n_docs = int(np.count_nonzero(tokens == tok.eot_token))  # every document starts with eot, only there
            writers[split].write(tokens)
            writers[split].documents += n_docs
            budget -= len(tokens)
            bar.update(len(tokens))
            if budget <= 0:
                break
        bar.close()
        for writer in writers.values():
            writer.close()
        meta = {
            "version": FORMAT_VERSION,
            "tokenizer": tokenizer,
            "tokenizer_file": tok.file.name,
            "tokenizer_sha256": tok.file_sha256,
            "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token,
            "dtype": dtype,
            "source": source_label(source),
            "options": options,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "prepare_seconds": round(time.time() - started, 2),
            "splits": {split: writer.summary() for split, writer in writers.items()},
        }
        if corpus_meta is not None:
            meta["corpus"] = corpus_meta
        if meta["splits"]["train"]["tokens"] == 0:
            raise ValueError(f"source {source_label(source)!r} produced no training tokens")
        write_meta(tmp, meta)
        if out.exists():
            shutil.rmtree(out)  # only reached when empty or overwrite=True
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_PREPARE_KEYWORDS = {"val_fraction", "max_tokens", "shard_tokens", "hf_split", "text_field", "streaming",
                      "hf_data_files", "corpus_dir", "train_parts", "workers", "progress"}  # fmt: skip


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """Serialise preparation across processes on one host (torchrun ranks all call ensure_prepared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_prepared(
    source: str | list[str] = "embedded",
    tokenizer: str = "gpt2",
    root: str | Path | None = None,
    **options,
) -> Path:
    """Return root/<source>-<tokenizer>/, preparing it first if it does not exist yet.

    An existing folder is reused only if it was made from the same source, tokenizer vocabulary and options;
    otherwise this fails and says why, instead of silently training on something else.
    """
    check_tokenizer_name(tokenizer)
    unknown = set(options) - _PREPARE_KEYWORDS
    if unknown:
        raise TypeError(f"ensure_prepared got unknown option(s) {sorted(unknown)}; known: {sorted(_PREPARE_KEYWORDS)}")
    root = Path(root) if root is not None else DEFAULT_ROOT
    out = root / data_dir_name(source, tokenizer, check_train_parts(options.get("train_parts")))
    with _exclusive_lock(root / f".{out.name}.lock"):
        if not (out / META_FILE).exists():
            return prepare(source, tokenizer, out, overwrite=True, **options)
        meta = read_meta(out)
        defaults = dict(val_fraction=0.05, max_tokens=None, shard_tokens=DEFAULT_SHARD_TOKENS, hf_split="train",
                        text_field="text", hf_data_files=None, train_parts=None)  # fmt: skip
        wanted = {**defaults, **{k: v for k, v in options.items() if k in defaults}}
        expected = {
            "source": source_label(source),
            "tokenizer": tokenizer,
            "tokenizer_sha256": tokenizer_file_sha256(tokenizer),
            "options": prepare_options(source, **wanted),
        }
        for field, value in expected.items():
            if meta.get(field) != value:
                raise DataFormatError(
                    f"{out} was prepared with {field}={meta.get(field)!r}, but {value!r} was asked for; "
                    f"delete {out} to prepare it again, or pass another root"
                )
        return out


def parse_token_count(text: str) -> int:
    """Accept 1000000, 1e6, 1_000_000."""
    value = float(text.replace("_", ""))
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of tokens, got {text!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", nargs="+", default=["embedded"],
                        help="'embedded', 'embedded_plus', 'embedded_all', 'pkg_corpus', 'hf:<dataset>[:<config>]', or local .txt/.md/.jsonl files, folders, globs")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 or qwen")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default workspace/data/<source>-<tokenizer>)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="held-out share for local and hf sources (the embedded corpus has a fixed split)")
    parser.add_argument("--max-tokens", type=parse_token_count, default=None, help="stop after this many tokens")
    parser.add_argument("--shard-tokens", type=parse_token_count, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--hf-split", default="train", help="which split of the HF dataset to read")
    parser.add_argument("--text-field", default="text", help="the HF dataset's text column")
    parser.add_argument("--hf-data-files", nargs="+", default=None, help="data_files for builders like hf:json")
    parser.add_argument("--no-streaming", action="store_true", help="download the whole HF split instead of streaming")
    parser.add_argument("--corpus-dir", type=Path, default=None,
                        help="pkg_corpus: the built parts (default $SFA_CORPUS_DIR or workspace/corpus/pkg_corpus; built there if absent)")
    parser.add_argument("--train-parts", type=int, default=None, help="pkg_corpus: use train parts 0..N-1 only")
    parser.add_argument("--workers", type=int, default=None, help="pkg_corpus: tokenizing processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    source = args.source[0] if len(args.source) == 1 else args.source
    try:
        out = prepare(
            source, args.tokenizer, args.out, val_fraction=args.val_fraction, max_tokens=args.max_tokens,
            shard_tokens=args.shard_tokens, hf_split=args.hf_split, text_field=args.text_field,
            streaming=not args.no_streaming, hf_data_files=args.hf_data_files, corpus_dir=args.corpus_dir,
            train_parts=args.train_parts, workers=args.workers, overwrite=args.overwrite,
        )  # fmt: skip
    except (ValueError, OSError, CorpusBuildError) as err:  # bad input and unavailable sources: a message, not a traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    meta = read_meta(out)
    counts = ", ".join(f"{s}: {info['tokens']:,} tokens in {len(info['shards'])} shard(s)" for s, info in meta["splits"].items())
    print(f"prepared {out} ({meta['tokenizer']}, {meta['dtype']}) in {meta['prepare_seconds']} s: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
