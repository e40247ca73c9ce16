"""The checkpoint format: this module is its only reader and writer.

A training checkpoint holds the model, optimizer and scheduler states, every rank's data-loader and RNG
states, the step and tokens seen, the config it was trained with and FORMAT_VERSION; train.py resumes from
it. A weights checkpoint (`save_weights`: a model converted from HF weights or built in a test) holds only
"model" and "config", which is all that evaluation and `init.from_checkpoint` read (`read_checkpoint`,
then `load_weights`, the one strict loader). Files are written to a temporary name in the same directory,
fsynced, then os.replace'd, so a crash leaves either the old set of checkpoints or the new one, never a torn
file. Layout: <out_dir>/checkpoints/step_00000010.pt.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})\.pt$")

# Config sections that define what is being trained. A checkpoint whose values differ here belongs to
# another run and is refused. Everything else (max_steps, intervals, logging, backend, paths) may change.
# The default run name hashes the same keys (training/run_names.py), so one directory holds one run.
IDENTITY_KEYS = ("model", "attention", "data.source", "data.tokenizer", "data.dir", "convert", "optim", "train.seq_len",
                 "train.batch_tokens", "train.seed")
# Leaves inside those sections that may change on resume: implementation choices that do not change the
# maths, and the schedule's horizon (extending a run moves it; the schedule is rebuilt from the new config).
MAY_CHANGE_KEYS = ("attention.backend", "attention.tag", "optim.decay_steps")


# Wrappers whose prefixes may appear in a saved state dict (torch.compile, DDP).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class ResumeError(ValueError):
    """A checkpoint that this run cannot resume from; the message says why and what to do instead."""


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this project, or weights that do not fit the model; the message
    names the file and the keys."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temporary files of interrupted saves are ignored)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


class _WriteErrorRecorder:
    """A file wrapper for torch.save that remembers the first OSError of a write (e.g. ENOSPC)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.file.flush()


def save_atomic(payload: dict[str, Any], path: str | Path, before_rename=None) -> Path:
    """torch.save to a temp file beside `path`, fsync it, rename it over `path`, fsync the directory.

    `before_rename` (tests only) is called between the write and the rename, to crash at that point."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _WriteErrorRecorder(f)
            try:
                torch.save(payload, writer)
            except RuntimeError as e:
                # torch.save reports a failed write as an opaque C++ error; surface the OSError behind it.
                if writer.error is None:
                    raise
                raise writer.error from e
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on the device writing checkpoint {path} ({e.strerror or e}); "
                          "the partial file was removed and earlier checkpoints are intact; free space and resume") from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def remove_partial_saves(out_dir: str | Path) -> list[Path]:
    """Delete temp files left by saves that were killed before their rename (they can be as big as a
    checkpoint, and are never read). Call only when no save is running (at start-up, on rank 0)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    partial = sorted(folder.glob(".step_*.pt.*.tmp")) if folder.is_dir() else []
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"train.resume: checkpoint {path} does not exist")
    # weights_only: a checkpoint is data, never code; every field we write is a tensor or plain Python.
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ResumeError(
            f"train.resume: {path} is unreadable (truncated or corrupt: {str(e).splitlines()[0]}); "
            "move it away to resume from the previous checkpoint"
        ) from e
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise ResumeError(f"train.resume: {path} is not a training checkpoint of this project (no format_version)")
    if payload["format_version"] > FORMAT_VERSION:
        raise ResumeError(
            f"train.resume: {path} has checkpoint format version {payload['format_version']}, newer than this "
            f"code reads (up to {FORMAT_VERSION}); update the code or start a new run"
        )
    return payload


def find_checkpoint(path: str | Path) -> Path:
    """A .pt file as given, or the newest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"checkpoint: run directory {path} has no {CHECKPOINT_DIR}/step_*.pt")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist (give a step_*.pt file or a run directory)")
    return path


def strip_wrapper_prefixes(state: dict) -> dict:
    """Parameter names as the plain model has them (without torch.compile's or DDP's prefixes)."""
    out = {}
    for name, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor
    return out


def read_checkpoint(path: str | Path) -> tuple[dict, dict, Path]:
    """(model state dict with plain parameter names, run config, resolved file) of a checkpoint file or of a
    run directory's newest checkpoint, training or weights-only."""
    path = find_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # data only, never code
    except Exception as err:  # torch raises several types for truncated/foreign files
        raise CheckpointError(f"checkpoint: cannot read {path} as a torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict) or not isinstance(payload.get("config"), dict):
        raise CheckpointError(f"checkpoint: {path} is not a checkpoint of this project (needs 'model' and 'config' entries)")
    return strip_wrapper_prefixes(payload["model"]), payload["config"], path


def save_weights(model: torch.nn.Module, config: dict, path: str | Path) -> Path:
    """A weights checkpoint: the fields `read_checkpoint` reads ("model", "config"), written atomically in the
    layout train.py uses. Optimizer, loader and RNG states are absent, so train.py cannot resume from it."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return save_atomic({"format_version": FORMAT_VERSION, "config": config, "model": state}, path)


def _few(names: list[str], shown: int = 5) -> str:
    return f"{names[:shown]}" + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


def load_weights(model: torch.nn.Module, state: dict, where: str, may_lack: tuple[str, ...] = ()) -> list[str]:
    """Copy `state` into `model`, strictly: every parameter and buffer present with its shape, nothing extra.
    Names ending in one of `may_lack` may be absent from `state`; they keep their initial value and are
    returned. `where` (e.g. the file) starts every error message."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    kept = [n for n in missing if may_lack and n.endswith(may_lack)]
    missing = [n for n in missing if n not in kept]
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        allowed = f" (only names ending in {list(may_lack)} may be absent; they keep their initial value)" if may_lack else ""
        raise CheckpointError(
            f"{where}: the weights do not fit this model: missing {_few(missing)} and unexpected {_few(unexpected)}{allowed}"
        )
    mismatched = [f"{n}: source {tuple(state[n].shape)} vs model {tuple(target[n].shape)}"
                  for n in sorted(state) if state[n].shape != target[n].shape]
    if mismatched:
        raise CheckpointError(f"{where}: shape mismatch:\n  " + "\n  ".join(mismatched))
    model.load_state_dict({**{n: target[n] for n in kept}, **state}, strict=True)
    return kept


def _select(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def identity_leaves(cfg: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> dict[str, Any]:
    """The flattened leaves of `keys` that define a run ({"optim.lr": 6e-4, ...}), MAY_CHANGE_KEYS left out."""
    leaves: dict[str, Any] = {}
    for key in keys:
        leaves.update(_flatten(_select(cfg, key), key))
    return {k: v for k, v in sorted(leaves.items()) if k not in MAY_CHANGE_KEYS}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Identity keys whose values differ between a checkpoint's config and the current one."""
    old, new = identity_leaves(saved), identity_leaves(current)
    return [f"{leaf}: checkpoint {old.get(leaf)!r} vs now {new.get(leaf)!r}"
            for leaf in sorted(set(old) | set(new)) if old.get(leaf) != new.get(leaf)]


def check_compatible(payload: dict[str, Any], config: dict, world_size: int, path: str | Path) -> None:
    """Refuse a checkpoint of another model/config, or one written by a different number of processes."""
    diffs = config_differences(payload["config"], config)
    if diffs:
        # Only an explicit run_name/out_dir (or train.resume) can get here: the default run name hashes
        # these keys, so without them this config gets a directory of its own.
        raise ResumeError(
            f"train.resume: checkpoint {path} was trained with another config; differing keys:\n  "
            + "\n  ".join(diffs)
            + "\nGive this run its own directory: leave out run_name=/out_dir= (the default name follows the config) "
            "or pick a new run_name=...; or leave out train.resume= if it points at another run"
        )
    if payload["world_size"] != world_size:
        raise ResumeError(
            f"train.resume: checkpoint {path} was written by {payload['world_size']} processes but this run has "
            f"{world_size}; data-loader positions are per process, so resume with the same number of processes"
        )


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if present) CUDA generator states, in weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
