"""Training batches one step ahead.

While the device works on a step, a background thread reads the next micro-batch from the memory-mapped
shards (data.loader.TokenLoader) and, on CUDA, copies it into pinned host memory, so that the host never
waits for the disk and the copy to the device is asynchronous (non_blocking=True from pinned memory).

The data position a checkpoint records is that after the batches handed out, not after the one read
ahead, so a resumed run reads exactly the batches the straight run would have.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class Prefetcher:
    """`next_batch()` like the loader's, but on `device` and read one batch ahead."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.pin = device.type == "cuda"
        # The thread pins on this rank's GPU: without set_device it would open a context on GPU 0. A device
        # without an index ("cuda") means the current one, which the thread then uses too.
        index = device.index if device.index is not None else (torch.cuda.current_device() if self.pin else None)
        init = (lambda: torch.cuda.set_device(index)) if self.pin else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch", initializer=init)
        self._ahead: Future | None = None
        self._state = loader.state_dict()  # the position after the batches handed out

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) on the device; the one after it starts reading now."""
        x, y = self._ahead.result() if self._ahead is not None else self._read()
        self._state = self.loader.state_dict()  # the thread is idle here: no read in flight
        self._ahead = self._pool.submit(self._read)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._drop_ahead()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.result()  # let the read finish before the loader is moved
            self._ahead = None

    def close(self) -> None:
        self._drop_ahead()
        self._pool.shutdown()
