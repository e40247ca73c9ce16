"""The scale-up recipe (scripts/scaleup.sh) rehearsed on CPU: two gloo processes under torchrun with FSDP2, the
real experiment=scaleup_qwen3_0.6b command with tiny shapes on the embedded corpus. Every stage runs: the
time-limited scaling run and its resume, a full arm, and the arm again with rank 1 killed mid-run under
--max-restarts=1, which must resume and reproduce the uninterrupted arm exactly (CPU and gloo are deterministic)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ("model=qwen3_tiny data=embedded train.seq_len=32 train.batch_tokens=256 train.micro_batch=4 "
        "train.max_steps=8 train.eval_every=4 train.ckpt_every=4 optim.warmup_steps=2 train.eval_batches=2 "
        "train.log_every=1")

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


@pytest.mark.slow
def test_scaleup_recipe_rehearsed_on_two_cpu_processes(tmp_path):
    out = tmp_path / "scaleup"
    env = dict(os.environ, NGPU="2", SCALING_SIZES="2", SCALING_S="2", KILL_STEP="6", EXTRA_OVERRIDES=TINY,
               ARMS="sfa-k16-rope32=attention=sfa,attention.k=16,attention.rope=decoupled,attention.rope_dims=32",
               SCALING_ARMS="sfa-k16-rope32", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", str(REPO / "scripts" / "scaleup.sh"), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "scaleup.json").read_text())

    (arm,) = result["arms"]
    assert arm["arm"] == "sfa-k16-rope32" and arm["world_size"] == 2 and arm["steps"] == 8
    assert arm["final_val_loss"] is not None and arm["kv_cache_bytes_per_token"] > 0

    (scaling,) = result["scaling"]
    assert scaling["gpus"] == 2 and scaling["tokens_per_s"] > 0
    assert scaling["ckpt_save_s"] and scaling["resume_s"], "the save and resume times must be logged"

    kill = result["kill"]
    assert kill["resumed"] and kill["each_step_once"] and kill["steps"] == [8, 8]
    assert kill["max_abs_loss_diff"] == 0.0 and kill["final_val_loss"][0] == kill["final_val_loss"][1]
    assert "(exitcode: -9) local_rank: 1" in (out / "logs" / "kill-sfa-k16-rope32.log").read_text()  # it died
