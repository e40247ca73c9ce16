"""Where metrics go: metrics.jsonl (always), wandb (online / offline / disabled; optional, never fatal),
and the console (a tqdm bar on a terminal, a quiet line every `log_every` steps otherwise)."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("train")


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN/Inf; a diverged loss is written as null (and shows as nan on the console).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlSink:
    """One JSON object per line in <out_dir>/metrics.jsonl, flushed per record."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def _drop_records_after(self, step: int) -> None:
        """After a resume, forget records past the checkpoint (they are about to be replayed), so the file
        keeps one trajectory. A fresh run (step 0) starts the file empty."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if record.get("step", 0) <= step and step > 0:
                kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def metrics_file(run_dir: str | Path) -> Path | None:
    """<run_dir>/metrics.jsonl, or the gzipped copy kept in docs/results (metrics.jsonl.gz); None if neither."""
    for name in ("metrics.jsonl", "metrics.jsonl.gz"):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records JsonlSink wrote (plain or gzipped), skipping a line torn by a crash."""
    path = metrics_file(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (or metrics.jsonl.gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class WandbSink:
    """wandb, imported lazily. Absence (ImportError), init failures and log failures warn once and turn
    the sink off; the run goes on. mode=disabled never imports wandb."""

    def __init__(self, logging_cfg, config: dict, out_dir: Path, run_name: str):
        self.run, self.mode, self.out_dir = None, logging_cfg.mode, Path(out_dir)
        if logging_cfg.mode == "disabled":
            return
        try:
            import wandb  # lazy: optional and heavy; logging.mode=disabled never imports it

            id_file = Path(out_dir) / "wandb_run_id"  # the same wandb run continues after a resume
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            self.run = wandb.init(
                mode=logging_cfg.mode, project=logging_cfg.project, entity=logging_cfg.entity,
                group=logging_cfg.group, tags=list(logging_cfg.tags), name=run_name, id=run_id,
                resume="allow", dir=str(out_dir), config=config,
                # WANDB_INIT_TIMEOUT shortens the wait for an unreachable server (tests use a few seconds).
                settings=wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 60)), silent=True),
            )
            id_file.write_text(run_id)
        except Exception as e:  # noqa: BLE001 - wandb must never stop a run, whatever it raises
            self._disable(f"wandb could not start ({type(e).__name__}: {e}); continuing without it")

    def _disable(self, message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        log.warning(message)
        self.run = None

    def write(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
        except Exception as e:  # noqa: BLE001
            self._disable(f"wandb.log failed ({type(e).__name__}: {e}); continuing without wandb")

    def close(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("wandb.finish failed (%s: %s)", type(e).__name__, e)
            return
        if self.mode == "offline":  # nothing reached wandb's servers yet: say how to upload
            log.info("wandb ran offline; upload this run with: wandb sync %s", self.out_dir / "wandb" / "offline-run-*")


def format_record(record: dict[str, Any]) -> str:
    """A short console line: step, losses, lr, throughput, MFU."""
    parts = [f"step {record['step']}"]
    # lm_loss / match_loss: the two terms of a conversion run's loss (convert=eq8), absent otherwise.
    for key, fmt in (("loss", "{:.4f}"), ("lm_loss", "{:.4f}"), ("match_loss", "{:.4g}"), ("val_loss", "{:.4f}"),
                     ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
                     ("tokens_per_s", "{:,.0f}"), ("step_time_s", "{:.3f}"), ("mfu", "{:.1%}")):
        value = record.get(key)
        if value is not None:
            parts.append(f"{key} " + fmt.format(value))
    return " | ".join(parts)


class Progress:
    """A tqdm bar on a terminal, a log line every `every` steps (and for every eval) in any case.

    With the bar, log records go through tqdm (logging_redirect_tqdm), so the lines land above the bar
    on the console and in train.log as they would without one."""

    def __init__(self, enabled: bool, total: int, initial: int, every: int):
        self.enabled, self.every, self.bar = enabled, every, None
        self._redirect = contextlib.ExitStack()
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            self._redirect.enter_context(logging_redirect_tqdm())

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(format_record(record).split(" | ", 1)[-1], refresh=False)
        if "val_loss" in record or (self.every and record["step"] % self.every == 0):
            log.info(format_record(record))

    def close(self) -> None:
        self._redirect.close()
        if self.bar is not None:
            self.bar.close()
