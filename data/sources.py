"""Where documents come from: an embedded corpus, local text files, or a Hugging Face `datasets` name.

Each source yields `Document(text, split)` in a deterministic order with a deterministic train/val split,
so preparing the same source twice gives the same shards.
"""

from __future__ import annotations

import glob
import json
import lzma
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

_CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
EMBEDDED_CORPUS = _CORPUS_DIR / "shakespeare.jsonl.xz"
# The corpora that ship with the repository (offline, fixed splits), by source name. `embedded` is the default
# job's; `embedded_plus` adds the King James Bible and Jane Austen's novels (data/corpus/README.md), about 2.4x
# the training text, for comparisons that want more data than Shakespeare alone without the network;
# `embedded_all` adds to that the State of the Union addresses and Moby-Dick, the largest offline corpus.
# Each name lists its parts in order; a larger one starts with the smaller one's parts, so their documents agree.
EMBEDDED_SOURCES = {
    "embedded": (EMBEDDED_CORPUS,),
    "embedded_plus": (EMBEDDED_CORPUS, _CORPUS_DIR / "kjv_austen.jsonl.xz"),
    "embedded_all": (EMBEDDED_CORPUS, _CORPUS_DIR / "kjv_austen.jsonl.xz", _CORPUS_DIR / "sotu_moby.jsonl.xz"),
}
LOCAL_SUFFIXES = (".txt", ".md", ".jsonl")
HF_PREFIX = "hf:"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Document:
    text: str
    split: str  # "train" or "val"


class DataSourceError(ValueError):
    """A source named on the command line or in the config cannot be read as documents."""


class DatasetUnavailableError(ConnectionError):
    """A Hugging Face dataset could not be loaded (offline, no network, unknown name...)."""


def check_val_fraction(val_fraction: float) -> float:
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise DataSourceError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return float(val_fraction)


# --- the embedded corpus ---------------------------------------------------------------------------------


def embedded_documents(corpus_files: Iterable[Path] = (EMBEDDED_CORPUS,)) -> Iterator[Document]:
    """The works of shipped corpus files (public domain), in file order; each work's split is fixed in the file."""
    corpus_files = [Path(corpus_files)] if isinstance(corpus_files, (str, Path)) else list(corpus_files)
    for corpus_file in corpus_files:  # all checked first: a missing file fails before any work is read
        if not corpus_file.is_file():
            raise DataSourceError(f"embedded corpus {corpus_file} is missing; it ships with the repository (git checkout it)")
    for corpus_file in corpus_files:
        with lzma.open(corpus_file, "rt", encoding="utf-8") as f:
            for line in f:
                work = json.loads(line)
                yield Document(work["text"], work["split"])


# --- local files ------------------------------------------------------------------------------------------


def expand_local_paths(patterns: Iterable[str]) -> list[Path]:
    """Files named directly, every supported file under a directory (recursively), or glob matches; sorted."""
    files: list[Path] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
            if not matches:
                raise DataSourceError(f"glob {pattern!r} matches no files")
            found = matches
        elif Path(pattern).is_dir():
            found = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
            if not found:
                raise DataSourceError(f"directory {pattern!r} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        elif Path(pattern).is_file():
            found = [Path(pattern)]
        else:
            raise DataSourceError(f"source {pattern!r} is neither an embedded corpus ({', '.join(EMBEDDED_SOURCES)}), 'hf:<name>', nor an existing file, directory or glob")
        for path in found:
            if path.suffix not in LOCAL_SUFFIXES:
                raise DataSourceError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(LOCAL_SUFFIXES)}")
        files.extend(found)
    return list(dict.fromkeys(files))  # drop duplicates named twice, keep order


def read_local_texts(path: Path) -> list[str]:
    """A .txt/.md file is one document; a .jsonl file is one document per line, from its "text" field."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{path} is not UTF-8 text ({err})") from err
    if path.suffix != ".jsonl":
        return [content] if content.strip() else []
    texts = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"{path}:{line_number}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataSourceError(f'{path}:{line_number}: each line needs a string "text" field')
        if record["text"].strip():
            texts.append(record["text"])
    return texts


def split_tail_by_chars(texts: list[str], val_fraction: float) -> list[Document]:
    """Hold out the last documents, about val_fraction of the characters; one lone document is cut at a line."""
    if val_fraction == 0.0 or not texts:
        return [Document(t, "train") for t in texts]
    if len(texts) == 1:
        text = texts[0]
        cut = int(len(text) * (1.0 - val_fraction))
        line_end = text.rfind("\n", 0, cut)
        cut = line_end + 1 if line_end > 0 else cut
        return [Document(text[:cut], "train"), Document(text[cut:], "val")]
    target = val_fraction * sum(len(t) for t in texts)
    n_val, val_chars = 0, 0
    while val_chars < target and n_val < len(texts) - 1:  # keep at least one training document
        n_val += 1
        val_chars += len(texts[-n_val])
    n_train = len(texts) - n_val
    return [Document(t, "train" if i < n_train else "val") for i, t in enumerate(texts)]


def local_documents(patterns: Iterable[str], val_fraction: float = 0.05) -> list[Document]:
    val_fraction = check_val_fraction(val_fraction)
    texts = [text for path in expand_local_paths(patterns) for text in read_local_texts(path)]
    if not texts:
        raise DataSourceError(f"sources {list(patterns)} hold no non-empty documents")
    return split_tail_by_chars(texts, val_fraction)


# --- Hugging Face datasets --------------------------------------------------------------------------------


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """'hf:NAME' or 'hf:NAME:CONFIG' -> (NAME, CONFIG or None)."""
    spec = source[len(HF_PREFIX):]
    name, _, config = spec.partition(":")
    if not name:
        raise DataSourceError(f"source {source!r} names no dataset; write hf:<name> or hf:<name>:<config>")
    return name, (config or None)


def is_val_index(index: int, val_fraction: float) -> bool:
    """Spread held-out documents evenly through a stream: exactly floor(n * val_fraction) of the first n."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def load_hf_dataset(name: str, config: str | None, hf_split: str, streaming: bool, data_files=None):
    """A `datasets` split by hub name or builder ("json", "parquet" + data_files), or a save_to_disk folder."""
    import datasets  # lazy: heavy, and only the hf: sources need it

    try:
        if Path(name).is_dir() and (Path(name) / "dataset_dict.json").is_file():
            return datasets.load_from_disk(name)[hf_split]
        if Path(name).is_dir() and (Path(name) / "state.json").is_file():
            return datasets.load_from_disk(name)
        return datasets.load_dataset(name, config, split=hf_split, streaming=streaming, data_files=data_files)
    except Exception as err:  # datasets raises many types here; all mean "cannot get this dataset"
        offline = any(os.environ.get(v, "0") not in ("", "0", "false", "False") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        why = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set" if offline else "no network, or no such dataset/config/split"
        raise DatasetUnavailableError(
            f"could not load Hugging Face dataset {name!r} (config={config!r}, split={hf_split!r}): {why}. "
            f"Original error: {type(err).__name__}: {err}. To prepare data offline use the embedded corpus "
            "(--source embedded) or local files (--source path/to/*.txt|*.jsonl), or copy the dataset here "
            "while online (datasets' save_to_disk) and pass that folder as hf:/path/to/folder"
        ) from err


def hf_documents(
    source: str,
    val_fraction: float = 0.05,
    hf_split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
    data_files=None,
) -> Iterator[Document]:
    val_fraction = check_val_fraction(val_fraction)
    name, config = parse_hf_source(source)
    dataset = load_hf_dataset(name, config, hf_split, streaming, data_files)
    for index, record in enumerate(dataset):
        if text_field not in record:
            raise DataSourceError(f"dataset {name!r} has no field {text_field!r}; it has {sorted(record)} (use --text-field)")
        text = record[text_field]
        if isinstance(text, str) and text.strip():
            yield Document(text, "val" if is_val_index(index, val_fraction) else "train")


# --- dispatch ---------------------------------------------------------------------------------------------


def is_embedded(source: str | list[str]) -> bool:
    """A corpus shipped with the repository (its split is fixed, val_fraction does not apply)."""
    sources = [source] if isinstance(source, str) else list(source)
    return len(sources) == 1 and sources[0] in EMBEDDED_SOURCES


def iter_documents(source: str | list[str], val_fraction: float = 0.05, **hf_options) -> Iterable[Document]:
    """Documents of an embedded corpus (a name in EMBEDDED_SOURCES), 'hf:NAME[:CONFIG]', or local
    paths/directories/globs (a list or one string)."""
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise DataSourceError("no source given")
    if is_embedded(sources):
        return embedded_documents(EMBEDDED_SOURCES[sources[0]])
    if len(sources) == 1 and sources[0].startswith(HF_PREFIX):
        return hf_documents(sources[0], val_fraction=val_fraction, **hf_options)
    if any(s in EMBEDDED_SOURCES or s.startswith(HF_PREFIX) for s in sources):
        raise DataSourceError(f"embedded ({', '.join(EMBEDDED_SOURCES)}) and 'hf:' sources cannot be combined with others: {sources}")
    return local_documents(sources, val_fraction)
