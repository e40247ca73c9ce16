"""The on-disk format of a prepared data directory, and the checks that guard it.

    <data_dir>/meta.json               what the shards are (fields below)
    <data_dir>/train_000000.bin ...    raw little-endian token ids, no header, dtype from meta.json
    <data_dir>/val_000000.bin ...
    <data_dir>/train_000000.mask.bin   optional per-token loss mask (uint8, one byte per token of the shard)

meta.json (FORMAT_VERSION 1):
    version, tokenizer, tokenizer_file, tokenizer_sha256, vocab_size, eot_token, dtype ("uint16"|"uint32"),
    source, options (how it was prepared), created (UTC, ISO 8601),
    splits: {split: {tokens, documents, shards: [{file, tokens}, ...], loss_mask (optional bool)}}
Every document starts with eot_token, so documents are delimited and the first token of a window is
never a continuation across an unseen boundary.

Loss mask: a split with `"loss_mask": true` has, beside each non-empty shard `X.bin`, a file `X.mask.bin`
of the same number of entries (uint8): nonzero = this token is a training target, 0 = context only
(writers write 0/1). A split without the key (every directory written before masks existed) has none and
every token is a target. The key is optional, so FORMAT_VERSION stays 1 and old directories read as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
_REQUIRED_FIELDS = {
    "version": int,
    "tokenizer": str,
    "tokenizer_sha256": str,
    "vocab_size": int,
    "eot_token": int,
    "dtype": str,
    "source": str,
    "splits": dict,
}
_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
MASK_DTYPE = np.uint8


class DataFormatError(ValueError):
    """A prepared data directory is missing, incomplete or inconsistent."""


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def mask_name(shard_file: str) -> str:
    """The loss-mask file beside a token shard: train_000000.bin -> train_000000.mask.bin."""
    if not shard_file.endswith(".bin"):
        raise DataFormatError(f"shard file name {shard_file!r} does not end in .bin, so it has no loss-mask name")
    return shard_file[: -len(".bin")] + ".mask.bin"


def has_loss_mask(meta: dict, split: str) -> bool:
    return bool(meta["splits"].get(split, {}).get("loss_mask", False))


def write_meta(data_dir: Path, meta: dict) -> None:
    path = Path(data_dir) / META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def read_meta(data_dir: str | Path) -> dict:
    """Load and validate meta.json; every problem is reported with the file it is in."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataFormatError(
            f"data directory {data_dir} does not exist; prepare it first, e.g. "
            f"`python -m data.prepare --source embedded --tokenizer gpt2 --out {data_dir}`"
        )
    path = data_dir / META_FILE
    if not path.is_file():
        raise DataFormatError(f"{path} is missing: {data_dir} is not a prepared data directory (run python -m data.prepare)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path} is not valid JSON ({err}); delete {data_dir} and prepare it again") from err
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path} must hold a JSON object, found {type(meta).__name__}")
    for field, kind in _REQUIRED_FIELDS.items():
        if field not in meta:
            raise DataFormatError(f"{path} lacks the field {field!r}")
        if not isinstance(meta[field], kind):
            raise DataFormatError(f"{path}: field {field!r} should be {kind.__name__}, found {meta[field]!r}")
    if meta["version"] != FORMAT_VERSION:
        raise DataFormatError(f"{path} has format version {meta['version']}, this code reads {FORMAT_VERSION}; prepare it again")
    if meta["dtype"] not in _DTYPES:
        raise DataFormatError(f"{path}: dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
    if meta["dtype"] != token_dtype(meta["vocab_size"]):
        raise DataFormatError(f"{path}: dtype {meta['dtype']} does not fit vocab_size {meta['vocab_size']}")
    for split, info in meta["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list) or not isinstance(info.get("tokens"), int):
            raise DataFormatError(f"{path}: splits.{split} needs 'tokens' (int) and 'shards' (list)")
        for shard in info["shards"]:
            if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("tokens"), int)):
                raise DataFormatError(f"{path}: splits.{split}.shards entries need 'file' (str) and 'tokens' (int), found {shard!r}")
        if not isinstance(info.get("loss_mask", False), bool):
            raise DataFormatError(f"{path}: splits.{split}.loss_mask should be true or false, found {info['loss_mask']!r}")
        if sum(s["tokens"] for s in info["shards"]) != info["tokens"]:
            raise DataFormatError(f"{path}: splits.{split}.tokens disagrees with the sum over its shards")
    return meta


def open_shards(data_dir: str | Path, split: str, meta: dict | None = None) -> list[np.memmap]:
    """Memory-map every shard of a split, checking each file's size against meta.json."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir) if meta is None else meta
    if split not in meta["splits"]:
        raise DataFormatError(f"{data_dir / META_FILE} has no split {split!r}; it has {sorted(meta['splits'])}")
    dtype = np.dtype(_DTYPES[meta["dtype"]])
    shards = []
    for shard in meta["splits"][split]["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise DataFormatError(f"shard {path} listed in meta.json is missing")
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise DataFormatError(
                f"shard {path} is {size} bytes, not a multiple of {meta['dtype']}'s {dtype.itemsize}: truncated or corrupt"
            )
        if size // dtype.itemsize != shard["tokens"]:
            raise DataFormatError(
                f"shard {path} holds {size // dtype.itemsize} tokens but meta.json says {shard['tokens']}: "
                "truncated or from another preparation; prepare the data again"
            )
        if shard["tokens"]:  # numpy cannot map an empty file
            shards.append(np.memmap(path, dtype=dtype, mode="r"))
    return shards


def open_masks(data_dir: str | Path, split: str, meta: dict | None = None) -> list[np.memmap] | None:
    """Memory-map the loss masks of a split, one per non-empty shard (aligned with open_shards), or None
    when the split declares no mask. A declared mask that is missing or of the wrong length is an error."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir) if meta is None else meta
    if split not in meta["splits"]:
        raise DataFormatError(f"{data_dir / META_FILE} has no split {split!r}; it has {sorted(meta['splits'])}")
    if not has_loss_mask(meta, split):
        return None
    masks = []
    for shard in meta["splits"][split]["shards"]:
        path = data_dir / mask_name(shard["file"])
        if not shard["tokens"]:  # no tokens, nothing to mask (and numpy cannot map an empty file)
            continue
        if not path.is_file():
            raise DataFormatError(
                f"loss mask {path} is missing: meta.json declares splits.{split}.loss_mask but the file is not there; "
                "prepare the data again"
            )
        size = path.stat().st_size  # one byte per token
        if size != shard["tokens"]:
            raise DataFormatError(
                f"loss mask {path} holds {size} entries but its shard {shard['file']} has {shard['tokens']} tokens: "
                "truncated or from another preparation; prepare the data again"
            )
        masks.append(np.memmap(path, dtype=MASK_DTYPE, mode="r"))
    return masks


def check_vocab(meta: dict, model_vocab_size: int) -> None:
    """Fail early if the data holds token ids the model's embedding table cannot look up."""
    if meta["vocab_size"] > model_vocab_size:
        raise ValueError(
            f"data was tokenized with {meta['tokenizer']!r} (vocab_size {meta['vocab_size']}) but the model's "
            f"vocab_size is {model_vocab_size}; ids up to {meta['vocab_size'] - 1} would index past its embeddings. "
            "Use a model with vocab_size >= the tokenizer's, or prepare the data with the model's tokenizer"
        )
