"""NIAH training data: prepared token shards + meta.json in data/'s format, read by data.loader.TokenLoader.

Layout of the token stream: every window of seq_len + 1 tokens (what TokenLoader cuts) holds whole
samples only, each as its own document `eot + prompt + answer`, packed from the window's start (or one
sample per window with `one_per_window`: no earlier sample's needle is then in view); the rest of a
window is filled with eot. So no sample is ever split across two training windows, the
loader's shuffling moves whole windows, and a model trained on it always sees needle, question and
answer together.

Loss (`loss_on`): "answer" (the default) writes a loss mask beside every shard (data/format.py) that is 1
on each sample's answer tokens and on the eot right after the answer (the next sample's first token or
the padding; absent only when a sample ends exactly at its window's end), 0 elsewhere: the model is
trained to copy the digits and then stop, which is what exact match asks. Every window holds at least
one sample, so every window has a target and no micro-batch's loss is NaN. "all" writes no mask: the
loss covers every token, as before masks existed (docs/evaluation.md).
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data.format import FORMAT_VERSION, mask_name, shard_name, token_dtype, write_meta
from data.prepare import ShardWriter

from .niah import NeedleFormat, train_samples

SPLIT_STREAMS = {"train": 0, "val": 1}
LOSS_ON = ("answer", "all")
SHARD_TOKENS = 100_000_000


def max_answer_tokens(fmt: NeedleFormat) -> int:
    """An upper bound on the answer's token count: every character its own token, at worst."""
    return len(fmt.answer.format(answer="9" * fmt.digits))


def check_training_lengths(lengths, seq_len: int, fmt: NeedleFormat) -> None:
    budget = seq_len + 1 - 1 - max_answer_tokens(fmt)  # window - leading eot - the longest answer
    too_long = [n for n in lengths if n > budget]
    if too_long:
        raise ValueError(
            f"lengths {too_long} do not fit a training window: with seq_len={seq_len} a prompt may have at most "
            f"{budget} tokens (seq_len + 1 minus the leading eot and up to {max_answer_tokens(fmt)} answer tokens)"
        )


def write_split(writer, samples, window: int, eot: int, mask_writer=None, one_per_window: bool = False) -> int:
    """Pack samples into windows of `window` tokens (see the module doc); returns the windows written.
    With `mask_writer`, also write the answer-only loss mask, entry for entry with the tokens. With
    `one_per_window`, every sample gets a window of its own (the rest is eot padding)."""
    tokens, mask, windows = [], [], 0

    def flush():
        nonlocal windows
        ended = len(tokens)  # the last sample ends here: its answer is followed by the padding's first eot
        tokens.extend([eot] * (window - ended))
        mask.extend([0] * (window - ended))
        if ended < window:
            mask[ended] = 1
        writer.write(np.asarray(tokens, dtype=np.int64))
        if mask_writer is not None:
            mask_writer.write(np.asarray(mask, dtype=np.uint8))
        tokens.clear()
        mask.clear()
        windows += 1

    for s in samples:
        doc = [eot, *s.input_ids, *s.answer_ids]
        if len(doc) > window:  # guarded by check_training_lengths; a real bug if reached
            raise AssertionError(f"sample of {len(doc)} tokens exceeds the window of {window}")
        if tokens and (one_per_window or len(tokens) + len(doc) > window):
            flush()
        # The leading eot is a target when it follows an earlier sample's answer in this window.
        doc_mask = [1 if tokens else 0] + [0] * len(s.input_ids) + [1] * len(s.answer_ids)
        tokens.extend(doc)
        mask.extend(doc_mask)
        writer.documents += 1
    if tokens:
        flush()
    return windows


def write_training_data(
    out: str | Path, tokenizer, haystack, fmt: NeedleFormat, *, seq_len: int, lengths, train_count: int,
    val_count: int, seed: int, loss_on: str = "answer", one_per_window: bool = False, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write train/val NIAH samples to `out` (shards + meta.json, and loss masks with loss_on="answer");
    atomic like data/prepare.py."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON} (which tokens the training loss covers), got {loss_on!r}")

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (the training context), got {seq_len!r}")
    if isinstance(train_count, bool) or not isinstance(train_count, int) or train_count < 1:
        raise ValueError(f"train samples must be an int >= 1, got {train_count!r}")
    if isinstance(val_count, bool) or not isinstance(val_count, int) or val_count < 0:
        raise ValueError(f"val samples must be an int >= 0, got {val_count!r}")
    check_training_lengths(lengths, seq_len, fmt)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} already exists and is not empty; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    dtype = token_dtype(tokenizer.vocab_size)
    try:
        splits = {}
        for split, count in (("train", train_count), ("val", val_count)):
            writer = ShardWriter(tmp, split, dtype, shard_tokens=SHARD_TOKENS)
            mask_writer = None
            if loss_on == "answer":  # same lengths, same shard cuts: X.mask.bin matches X.bin entry for entry
                mask_writer = ShardWriter(tmp, split, "uint8", SHARD_TOKENS, name=lambda sp, i: mask_name(shard_name(sp, i)))
            samples = train_samples(tokenizer, haystack, fmt, lengths, count, seed, stream=SPLIT_STREAMS[split]) if count else []
            windows = write_split(writer, samples, seq_len + 1, tokenizer.eot_token, mask_writer, one_per_window)
            writer.close()
            splits[split] = {**writer.summary(), "windows": windows}
            if mask_writer is not None:
                mask_writer.close()
                splits[split]["loss_mask"] = True
        meta = {
            "version": FORMAT_VERSION,
            "tokenizer": tokenizer.name,
            "tokenizer_file": tokenizer.file.name,
            "tokenizer_sha256": tokenizer.file_sha256,
            "vocab_size": tokenizer.vocab_size,
            "eot_token": tokenizer.eot_token,
            "dtype": dtype,
            "source": f"niah ({haystack.description})",
            "options": {
                "generator": "scripts/niah.py make-data",
                "seq_len": seq_len,
                "lengths": list(lengths),
                "train_samples": train_count,
                "val_samples": val_count,
                "seed": seed,
                "loss_on": loss_on,
                "one_per_window": one_per_window,
                "needle": fmt.needle,
                "question": fmt.question,
                "answer": fmt.answer,
                "digits": fmt.digits,
                "haystack": haystack.description,
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "splits": splits,
        }
        write_meta(tmp, meta)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
