"""Running train.py as a user would (a subprocess) on a model small enough for CI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# One layer, two 32-wide heads (SFA k=8 of 32), 32-token sequences: a step takes milliseconds.
TINY = [
    "model.n_layer=1", "model.d_model=64", "model.n_head=2", "train.seq_len=32", "train.eval_batches=2",
    "train.log_every=1", "optim.warmup_steps=2", "logging=disabled",
]


def run_train(args, *, data_root: Path, root: Path, launcher=(sys.executable,), check=True, timeout=180):
    """Run train.py with TINY settings plus `args`; returns the CompletedProcess (stdout+stderr merged)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("SFA_WORKSPACE", None)
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) go before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [*launcher, str(REPO / "train.py"), *flags, *TINY, f"data.root={data_root}", f"root={root}", *overrides]
    # Own session, so a hung run (and torchrun's workers) can be killed as one group on timeout.
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as child:
        try:
            out, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            raise AssertionError(f"train.py timed out after {timeout}s:\n{' '.join(cmd)}\n{out[-6000:]}") from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, out)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stdout[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
