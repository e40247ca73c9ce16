"""Every kernel a kernel_op registers compiles for sm_90 from the arguments the op really launches it with,
floats typed fp64 as torch.compile's inductor types them (tests/kernel_launches.py says why). No GPU needed:
Triton's compiler and ptxas ship in the triton wheel."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parent / "kernel_launches.py"
REPO = HELPER.parent.parent


def _run(*args, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(HELPER), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    launches = tmp_path_factory.mktemp("launches") / "launches.json"
    captured = _run("capture", str(launches), interpret=True)
    assert captured.returncode == 0, captured.stderr[-3000:]
    compiled = _run("compile", str(launches), interpret=False)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    return json.loads(compiled.stdout)


def test_every_registered_kernel_is_launched_by_the_capture(report):
    assert report["registered"], "no kernel_op registered a kernel"
    assert report["never_launched"] == [], "add a call of these ops to kernel_launches._run_every_op"


def test_every_launch_compiles_for_hopper_with_fp64_floats(report):
    assert report["compiled"]
    assert report["failed"] == {}, "\n".join(f"{launch}: {why}" for launch, why in report["failed"].items())
