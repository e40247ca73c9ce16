"""Exit 0 if a train.py run directory is finished: its metrics.jsonl has a val loss at the configured
train.max_steps (a run stopped early by a time limit or a signal is not). Exit 1 otherwise, or when the
directory holds no run. The study scripts use it to skip runs a previous call finished.

    python scripts/run_finished.py RUN_DIR && echo done
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.sinks import read_metrics  # noqa: E402  (plain or gzipped metrics.jsonl)


def finished(run: Path) -> bool:
    try:
        rows = read_metrics(run)
        max_steps = OmegaConf.load(run / "config.yaml").train.max_steps
    except (OSError, ValueError):
        return False
    return any(r.get("step") == max_steps and "val_loss" in r for r in rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/run_finished.py RUN_DIR")
    sys.exit(0 if finished(Path(sys.argv[1])) else 1)
