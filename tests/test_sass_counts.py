"""scripts/sass_counts.py: compiles the top-k and decode kernels for sm_90 without a GPU, counts their SASS, and
finds a loop body by its backward branch."""

import importlib.util
import json
import os
import subprocess
import sys

from train_helpers import REPO

spec = importlib.util.spec_from_file_location("sass_counts", REPO / "scripts" / "sass_counts.py")


def _module():
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    return sc


def test_loop_body_is_the_longest_backward_branch_span():
    code = [(0x00, "MOV", " R1, R2"), (0x10, "IMAD", " R1"), (0x20, "BRA", " 0x10"),  # a 2-instruction loop
            (0x30, "FFMA", " R3"), (0x40, "LDG", " R4"), (0x50, "FADD", " R5"), (0x60, "BRA", " 0x30"),
            (0x70, "BRA", " 0x90"), (0x80, "EXIT", "")]  # a forward branch is no loop
    assert _module().loop_body(code) == ["FFMA", "LDG", "FADD", "BRA"]


def test_script_prints_and_writes_counts_for_both_kernels(tmp_path):
    out = tmp_path / "counts.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}  # the real compiler
    proc = subprocess.run([sys.executable, "scripts/sass_counts.py", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["case"] for r in rows} == {"topk", "decode"}
    assert [r["config"] for r in rows if r["case"] == "decode"] == [
        f"{mode} T={t} rows={2 * t}" for t in (1, 4, 8) for mode in ("sfa", "dense")]  # 2 query heads per KV head
    for r in rows:
        assert r["per_byte"] > 0 and r["config"] in proc.stdout
    dense = {r["thread_instructions_per_key"] for r in rows if r["config"].startswith("dense")}
    assert len(dense) == 1, dense  # dense keys: one tensor-core dot per block, whatever the query rows
