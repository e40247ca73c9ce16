"""scripts/bench_topk.py's QK-epilogue part on the CPU (interpreter, fp32, tiny shapes, a counting timer): every
arm runs, fused rows equal the unfused ones, and the table prints. Timing itself needs the GPU."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_topk", REPO / "scripts" / "bench_topk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", ["full", "decoupled32"])
def test_epilogue_arms_run_and_agree(layout, capsys):
    bench = load_bench()
    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return 1.0 + len(calls)  # distinct, positive "ms"

    rows = bench.qk_epilogue(b=1, t=5, heads=(2, 1), d=64, k=6, layout=layout, device="cpu", timer=timer)
    assert [(r["heads"], r["kind"], r["path"]) for r in rows] == [
        (h, kind, path) for h in (2, 1) for kind in ("dense", "sfa") for path in ("unfused", "fused")]
    assert all(r["fused_vs_unfused_rel_diff"] < 1e-5 for r in rows), [r["fused_vs_unfused_rel_diff"] for r in rows]
    assert len(calls) == 2 * len(rows)  # forward and forward+backward of every arm
    assert all(r["step_ms"] == r["fwd_bwd_ms"] * bench.PASSES_PER_STEP for r in rows)
    bench.print_epilogue(rows)
    out = capsys.readouterr().out
    assert out.count(layout) == len(rows) and "x unfused" in out
