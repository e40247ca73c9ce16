"""Where train.py reads tokens from: `data.dir` (an already-prepared directory, e.g. what
`scripts/niah.py make-data` writes) or the cache data/prepare.py fills from `data.source`."""

from __future__ import annotations

from pathlib import Path

from data.format import DataFormatError, read_meta


def prepared_dir(path: str | Path, tokenizer: str) -> Path:
    """`data.dir` checked: a directory with a valid meta.json, tokenized with `tokenizer` (the model's);
    errors name data.dir."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.dir={path} is not a directory (give a prepared token directory with meta.json)")
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"data.dir={path} has no meta.json, so it is not a prepared token directory "
            "(make one with `python -m data.prepare` or `scripts/niah.py make-data`)"
        )
    try:
        meta = read_meta(path)
    except DataFormatError as err:
        raise DataFormatError(f"data.dir={path}: {err}") from err
    if meta["tokenizer"] != tokenizer:
        raise DataFormatError(
            f"data.dir={path} was tokenized with {meta['tokenizer']!r} but this run's data.tokenizer is {tokenizer!r}; "
            "prepare the directory with the model's tokenizer"
        )
    return path
