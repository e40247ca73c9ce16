"""Batches of token windows from prepared shards: memory-mapped, disjoint across ranks, resumable.

The split's shards are read as one stream of tokens, cut into non-overlapping windows of seq_len + 1
tokens (x is a window's first seq_len tokens, y the last seq_len). An epoch visits windows in an order
that depends only on (seed, epoch) - a seeded permutation for training, the stored order for validation -
and hands the i-th window of that order to rank i % world_size. Hence, within an epoch:
  - no two ranks ever read the same window, and
  - together the ranks read every window of the epoch exactly once.
If the window count is not a multiple of world_size, the permutation's last (count % world_size) windows
sit the epoch out (different ones each epoch), so every rank gets the same number of windows and ranks
stay in lockstep. A batch that reaches the end of an epoch continues in the next one.

The state (epoch, position) is the same on every rank, so any rank's state_dict resumes all of them.

Loss mask: if the split declares one (data/format.py), y is -1 wherever the *target* token's mask is 0,
so the models' cross_entropy(ignore_index=-1) skips it; x is unchanged. Every window must then hold at
least one target (checked once when the loader opens, for all windows at this seq_len): a micro-batch
with every target ignored would give a NaN loss. Masks change neither the order nor the state.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data.format import DataFormatError, check_vocab, open_masks, open_shards, read_meta

__all__ = ["TokenLoader", "check_vocab"]

STATE_VERSION = 1


class TokenLoader:
    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool | None = None,
    ):
        """`shuffle` defaults to True for "train" and False otherwise (repeatable evaluation)."""
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("world_size", world_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(seed, int) or seed < 0:  # numpy seeds must be non-negative integers
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.split = split
        self.batch_size, self.seq_len, self.rank, self.world_size, self.seed = batch_size, seq_len, rank, world_size, seed
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)

        self._shards = open_shards(self.data_dir, split, self.meta)
        self._masks = open_masks(self.data_dir, split, self.meta)  # None: every token is a target
        self.has_loss_mask = self._masks is not None
        lengths = [len(s) for s in self._shards]
        self._starts = np.cumsum([0] + lengths)  # token offset of each shard in the split's stream
        self.total_tokens = int(self._starts[-1])
        self.window = seq_len + 1
        self.n_windows = self.total_tokens // self.window
        self.windows_per_epoch = self.n_windows - self.n_windows % world_size
        if self.windows_per_epoch == 0:
            raise ValueError(
                f"seq_len={seq_len} is too long for split {split!r} of {self.data_dir}: it holds {self.total_tokens} "
                f"tokens, fewer than one window of seq_len+1={self.window} tokens per rank (world_size={world_size}). "
                "Use a shorter seq_len or prepare more data"
            )
        # Tokens the model sees per epoch, all ranks together (each window gives seq_len inputs/targets).
        self.tokens_per_epoch = self.windows_per_epoch * seq_len

        if self.has_loss_mask:
            self._check_every_window_has_a_target()

        self.epoch = 0
        self.position = 0  # windows of this epoch handed out so far, all ranks together (a multiple of world_size)
        self._order_epoch, self._order = None, None

    # --- order and reading ------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices of `epoch` in visiting order (all ranks); the same on every rank and every run."""
        if not self.shuffle:
            return np.arange(self.windows_per_epoch, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.n_windows)[: self.windows_per_epoch]

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, self.epoch_order(epoch)
        return self._order

    def _read(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        """Entries [start, stop) of the split's stream (token shards or their masks), across shard edges."""
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - self._starts[shard]
            take = min(stop - start, len(arrays[shard]) - offset)
            pieces.append(arrays[shard][offset : offset + take])
            start += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def read_window(self, index: int) -> np.ndarray:
        """Tokens [index*(seq_len+1), (index+1)*(seq_len+1)) of the split's stream, across shard edges."""
        return self._read(self._shards, index * self.window, (index + 1) * self.window)

    def read_window_mask(self, index: int) -> np.ndarray | None:
        """The loss mask of window `index` (same span as read_window), or None without a mask."""
        if self._masks is None:
            return None
        return self._read(self._masks, index * self.window, (index + 1) * self.window)

    def _check_every_window_has_a_target(self, block_bytes: int = 1 << 24) -> None:
        """Refuse a split where some window's targets (its last seq_len tokens) are all masked out.
        Reads the mask in blocks of whole windows of about `block_bytes` (memory stays small at any size)."""
        windows_per_block = max(1, block_bytes // self.window)
        for first in range(0, self.n_windows, windows_per_block):
            last = min(first + windows_per_block, self.n_windows)
            block = self._read(self._masks, first * self.window, last * self.window).reshape(last - first, self.window)
            empty = np.flatnonzero(~(block[:, 1:] != 0).any(axis=1))
            if empty.size:
                raise DataFormatError(
                    f"split {self.split!r} of {self.data_dir} has windows with no loss target at seq_len={self.seq_len} "
                    f"(first: window {first + int(empty[0])}, {empty.size} in windows {first}..{last - 1}); their loss "
                    "would be NaN. Train at the seq_len the data was made for (meta.json options), or remake the data"
                )

    def _batch_from_windows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.read_window(i) for i in indices]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        x, y = tokens[:, :-1], tokens[:, 1:]
        if self._masks is not None:
            masks = torch.from_numpy(np.stack([self.read_window_mask(i) for i in indices])[:, 1:] != 0)
            y = y.masked_fill(~masks, -1)  # the models' cross_entropy ignores -1
        return x, y

    # --- training stream ----------------------------------------------------------------------------------

    def next_window_index(self) -> int:
        index = int(self._order_for(self.epoch)[self.position + self.rank])
        self.position += self.world_size
        if self.position == self.windows_per_epoch:  # roll over at once, so `epoch` counts finished epochs
            self.epoch += 1
            self.position = 0
        return index

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (batch_size, seq_len) on the CPU; y[:, t] is the token after x[:, t]."""
        return self._batch_from_windows([self.next_window_index() for _ in range(self.batch_size)])

    # --- evaluation ---------------------------------------------------------------------------------------

    @property
    def eval_batches_available(self) -> int:
        """Batches one pass over this rank's share holds (the last one may be short)."""
        return -(-(self.windows_per_epoch // self.world_size) // self.batch_size)

    def iter_eval_batches(self, n_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of epoch 0's windows, from the start every call: the same batches every time.

        Independent of next_batch's position. `None` means one full pass; the last batch may have fewer rows.
        """
        available = self.eval_batches_available
        if n_batches is None:
            n_batches = available
        elif n_batches > available:
            warnings.warn(
                f"asked for {n_batches} eval batches but split {self.split!r} of {self.data_dir} holds {available} "
                f"(batch_size={self.batch_size}, seq_len={self.seq_len}, world_size={self.world_size}); using {available}",
                stacklevel=2,
            )
            n_batches = available
        mine = self.epoch_order(0)[self.rank :: self.world_size]
        for b in range(n_batches):
            yield self._batch_from_windows([int(i) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]])

    # --- resume -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Small and JSON-able; the same on every rank. batch_size may change across a resume."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken: the following batches are bit-identical."""
        missing = {"version", "seed", "shuffle", "epoch", "position", "seq_len", "world_size", "n_windows"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}; was it saved by TokenLoader.state_dict()?")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"loader state has version {state['version']}, this code reads {STATE_VERSION}")
        for field in ("seq_len", "world_size", "n_windows", "shuffle"):
            if state[field] != getattr(self, field):
                raise ValueError(
                    f"cannot resume: loader state has {field}={state[field]!r} but this loader has {getattr(self, field)!r} "
                    f"(data {self.data_dir}, split {self.split!r}); resume with the same data, seq_len and world_size"
                )
        if not (0 <= state["position"] < self.windows_per_epoch and state["position"] % self.world_size == 0):
            raise ValueError(f"loader state position {state['position']} is impossible for {self.windows_per_epoch} windows per epoch")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
