"""What a training run does when things go wrong: stop signals, non-finite numbers, a disk that cannot
take the run's files, and the test hooks that let CI make those things happen on purpose.

- `StopSignals`: SIGTERM / SIGINT set a flag instead of killing the process; train.py checks it after each
  step, saves a checkpoint and exits with 128 + the signal number. A second signal kills as usual.
- `NonFiniteGuard`: a non-finite step never updates the weights, decided on the device (no host sync)
  through the fused optimizer's `found_inf`; the host reviews the steps when it next reads them (a log
  step), reports, and stops the run (train.nonfinite = skip | stop, train.nonfinite_max_consecutive).
- `preflight_out_dir` / `preflight_disk_space`: fail before training if the run directory cannot be
  written or has no room for a checkpoint.
- `test_hook`: SFA_TEST_HOOK=<name>[@<step>][:<rank>],... ; test-only behaviour (a pause at a known point
  so a test can kill the process there, a NaN loss, a rank that dies). Never set it in real runs. The
  training step reaches all of its hooks through one call, `inject`.

Docs: docs/reliability.md.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("train")

HOOK_ENV = "SFA_TEST_HOOK"
NONFINITE_POLICIES = ("skip", "stop")


# ----------------------------------------------------------------------------------------------- test hooks


@dataclass(frozen=True)
class Hook:
    name: str
    step: int | None  # None: at every step
    rank: int | None  # None: on every rank


def parse_hooks(spec: str) -> list[Hook]:
    """`name[@step][:rank]` items separated by commas, e.g. `pause_in_eval@8,die@5:1`."""
    hooks = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        rest, _, rank = item.partition(":")
        name, _, step = rest.partition("@")
        try:
            hooks.append(Hook(name, int(step) if step else None, int(rank) if rank else None))
        except ValueError:
            raise ValueError(f"{HOOK_ENV}: cannot parse {item!r}; expected name[@step][:rank]") from None
    return hooks


def test_hook(name: str, step: int | None = None, rank: int = 0) -> bool:
    """True if SFA_TEST_HOOK asks for `name` at this step on this rank. Cheap when the variable is unset."""
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return False
    return any(
        h.name == name and (h.step is None or h.step == step) and (h.rank is None or h.rank == rank)
        for h in parse_hooks(spec)
    )


def first_attempt() -> bool:
    """False in a run torchrun restarted (--max-restarts), so a hook that kills a rank fires only once."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


def pause_for_test(where: str, step: int | None, stop: "StopSignals | None" = None, seconds: float = 120.0) -> None:
    """Announce on stderr, then wait (for a test to SIGKILL or SIGTERM this process at a known point)."""
    print(f"{HOOK_ENV}: paused in {where} at step {step}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (stop is not None and stop.requested):
        time.sleep(0.02)


def inject(step: int, rank: int, loss, parameters, stop: "StopSignals | None" = None):
    """The test hooks of a training step, in one place: called once per step after the backward pass,
    before the gradients are clipped. Returns the step's loss, NaN under `nan_loss`. Does nothing (and
    reads nothing from the device) when SFA_TEST_HOOK is unset.

    pause_in_step (wait for a test's signal), die (SIGKILL this rank, as an OOM kill would), nan_loss (the
    loss and every gradient NaN, what a NaN loss's backward gives), nan_grad (one gradient NaN, the loss
    finite)."""
    if not os.environ.get(HOOK_ENV):
        return loss
    if test_hook("pause_in_step", step, rank):
        pause_for_test("step", step, stop)
    if test_hook("die", step, rank) and first_attempt():
        os.kill(os.getpid(), signal.SIGKILL)
    grads = [p.grad for p in parameters if p.grad is not None]
    if test_hook("nan_loss", step, rank):
        for g in grads:
            g.fill_(float("nan"))
        loss = loss * float("nan")
    if test_hook("nan_grad", step, rank):
        grads[0].fill_(float("nan"))
    return loss


# ------------------------------------------------------------------------------------------------- signals


class StopSignals:
    """SIGTERM / SIGINT ask the run to stop at the end of the current step (checkpoint first).

    Only the main thread may install handlers; elsewhere (e.g. a test calling train() from a thread) the
    signals keep their default behaviour. A second signal restores the default handler and re-raises it,
    so an impatient Ctrl-C still kills.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: give up on the clean stop
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("received %s: stopping after this step with a checkpoint (send it again to kill now)",
                    signal.Signals(signum).name)

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            _installed.append(self)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self in _installed:
            _installed.remove(self)


_installed: list[StopSignals] = []


def restore_signals() -> None:
    """Put back the handlers of every StopSignals still installed (after a run that raised)."""
    for stopper in reversed(list(_installed)):
        stopper.restore()


class StoppedBySignal(RuntimeError):
    """The run stopped cleanly (checkpoint written) because it was asked to; exit code 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum = signum
        name = signal.Signals(signum).name if signum else "a stop signal on another rank"
        super().__init__(f"stopped by {name} at step {step}; checkpoint {checkpoint} saved; "
                         "run the same command again to resume")


# ---------------------------------------------------------------------------------------- non-finite steps


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite numbers (a checkpoint of the last good weights was saved)."""


@dataclass
class NonFiniteGuard:
    """Two halves that follow the same rule. On the device, `skip_update` tells the optimizer to leave the
    weights alone on a non-finite step, and on every step after the stop condition was met (so nothing
    changes the last good weights before the host notices). On the host, `decide` reviews each step when
    the loop reads it, counts, logs, and `should_stop` says when to end the run."""

    policy: str = "skip"
    max_consecutive: int = 5
    skipped: int = 0  # steps whose update was skipped, over the whole run (restored on resume)
    consecutive: int = 0
    _device_run: object = field(default=None, repr=False)  # non-finite steps in a row, on the device
    _device_halted: object = field(default=None, repr=False)  # the stop condition was met, on the device

    def __post_init__(self):
        if self.policy not in NONFINITE_POLICIES:
            raise ValueError(f"train.nonfinite must be one of {', '.join(NONFINITE_POLICIES)}; got {self.policy!r}")
        if isinstance(self.max_consecutive, bool) or not isinstance(self.max_consecutive, int) or self.max_consecutive < 1:
            raise ValueError(f"train.nonfinite_max_consecutive must be a positive integer, got {self.max_consecutive!r}")

    @property
    def stop_after(self) -> int:
        """Non-finite steps in a row that end the run."""
        return 1 if self.policy == "stop" else self.max_consecutive

    def skip_update(self, loss, grad_norm):
        """The optimizer's found_inf for this step (1.0: leave weights and moments as they are), computed
        on the device from the step's loss and gradient norm, without reading either."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self._device_run is None:
            self._device_run = torch.zeros((), dtype=torch.int32, device=loss.device)
            self._device_halted = torch.zeros((), dtype=torch.bool, device=loss.device)
        self._device_run = torch.where(bad, self._device_run + 1, 0)
        self._device_halted = self._device_halted | (self._device_run >= self.stop_after)
        return (bad | self._device_halted).float()

    @staticmethod
    def cause(loss: float, grad_norm: float, bad_grads: list[str]) -> str | None:
        """None if the step is fine, else what was non-finite: the loss, or the gradients (naming them)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            named = ", ".join(bad_grads[:5]) + (f" and {len(bad_grads) - 5} more" if len(bad_grads) > 5 else "")
            return f"gradient norm is {grad_norm}" + (f" (non-finite gradient in {named})" if named else "")
        return None

    def decide(self, step: int, cause: str | None) -> bool:
        """Record a step's outcome (host side, in step order); True if its update was applied. Whether to
        stop is `should_stop()`'s answer (the caller then saves the last good state and raises NonFiniteError)."""
        if cause is None:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        log.warning("non-finite step %d: %s; update skipped (%d in a row, %d in this run)",
                    step, cause, self.consecutive, self.skipped)
        return False

    def should_stop(self) -> bool:
        return self.consecutive >= self.stop_after

    def stop_message(self, step: int, cause: str, checkpoint) -> str:
        why = ("train.nonfinite=stop" if self.policy == "stop"
               else f"{self.consecutive} non-finite steps in a row (train.nonfinite_max_consecutive={self.max_consecutive})")
        return (f"non-finite step {step}: {cause}; stopping ({why}). Checkpoint {checkpoint} holds the last good "
                "weights (its data position is past the bad batch). Lower optim.lr or raise optim.warmup_steps, "
                "then resume")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))


def nonfinite_names(names: list[str], norms: list[float]) -> list[str]:
    """The parameters whose gradient norm is NaN or Inf (names and norms in the same order)."""
    return [name for name, norm in zip(names, norms) if not math.isfinite(norm)]


# ---------------------------------------------------------------------------------------------- preflight


class PreflightError(OSError):
    """The run directory cannot hold this run's files; raised before any training."""


def preflight_out_dir(out_dir: Path) -> None:
    """The run directory and its checkpoints/ folder exist (or can be made) and accept a file."""
    for folder in (out_dir, out_dir / "checkpoints"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write_probe.{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise PreflightError(
                e.errno, f"out_dir: cannot write to {folder} ({e.strerror or e}); choose a writable out_dir / root"
            ) from e


def checkpoint_bytes_estimate(n_params: int) -> int:
    """fp32 weights + AdamW's two moments, the bulk of a checkpoint (loader/RNG states are tiny)."""
    return 3 * 4 * n_params


def preflight_disk_space(out_dir: Path, n_params: int, min_free_gb: float) -> int:
    """Fail unless out_dir's filesystem has room for two checkpoints (a save writes the new file before
    pruning an old one) and at least `min_free_gb`. Returns the free bytes."""
    free = shutil.disk_usage(out_dir).free
    need = max(2 * checkpoint_bytes_estimate(n_params), int(min_free_gb * 1e9))
    if free < need:
        raise PreflightError(
            errno.ENOSPC,
            f"out_dir: {out_dir} has {free / 1e9:.3g} GB free but this run needs {need / 1e9:.3g} GB "
            f"(two checkpoints of ~{checkpoint_bytes_estimate(n_params) / 1e9:.3g} GB, train.min_free_gb={min_free_gb}); "
            "free some space or choose another out_dir / root",
        )
    return free
