"""`pip install -e .` makes the packages importable from any folder, and docs/evaluation.md's offline
lm-eval example runs as written there (against a tiny checkpoint instead of the default job's)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from train_helpers import REPO


def doc_command() -> list[str]:
    text = (REPO / "docs" / "evaluation.md").read_text()
    block = text.split("**Offline example that runs as written**")[1].split("```bash")[1].split("```")[0]
    line = re.search(r"^python -m evaluation\.harness.*?(?<!\\)$", block.replace("\\\n", " "), re.M | re.S).group(0)
    return shlex.split(line)


@pytest.mark.slow
def test_editable_install_runs_the_documented_lm_eval_example_from_any_folder(tmp_path):
    from training.checkpoint import save_weights
    from training.hydra_setup import compose_run_config
    from training.run_config import model_from_config

    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-e", str(REPO), "--prefix", str(prefix)], check=True, timeout=300)
    [site_packages] = prefix.glob("lib/python*/site-packages")
    cfg = compose_run_config(["model.n_layer=1", "model.n_head=2", "model.d_model=64", "model.max_seq_len=64",
                              "attention=dense", f"root={tmp_path}"])
    save_weights(model_from_config(cfg), cfg, tmp_path / "quick" / "checkpoints" / "step_00000001.pt")

    args = doc_command()[3:]  # what follows "python -m evaluation.harness"
    args = [a.replace("../../../workspace/runs/quick", str(tmp_path / "quick")) for a in args]
    # Run from the task's folder, as documented. Like `python -m`, `python -c` puts that folder (not the repo)
    # on sys.path, so `evaluation` can only come from the install, whose .pth files a site dir reads.
    boot = (f"import runpy, site, sys; site.addsitedir({str(site_packages)!r}); sys.argv[0] = 'harness'; "
            "runpy.run_module('evaluation.harness', run_name='__main__', alter_sys=True)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", boot, *args], cwd=REPO / "tests" / "data" / "lm_eval_tiny", env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sfa_tiny_mc" in done.stdout and "acc" in done.stdout
