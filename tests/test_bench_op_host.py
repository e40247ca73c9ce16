"""scripts/bench_op_host.py: its pieces on CPU (the kernels under the interpreter): every entry point runs and
returns what the op returns, the host timing is per call, the profile names our launch path for the top-k op
and not for the baselines; and the command refuses a machine without a GPU and bad arguments in one line."""

import importlib.util
import time

import pytest
import torch

from train_helpers import REPO

spec = importlib.util.spec_from_file_location("bench_op_host", REPO / "scripts" / "bench_op_host.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_input_is_a_strided_head_view():
    x = bench.head_view(torch.device("cpu"), torch.float32)
    assert x.shape == (2, 2, 4, 64) and not x.is_contiguous() and x.stride(-1) == 1


def test_entry_points_run_the_ops():
    x = bench.head_view(torch.device("cpu"), torch.float32)
    calls = bench.entry_points(x, 8)
    assert {"aten x.mul(2)", "trivial custom op", "sfa::topk_code", "sfa::topk_code_masked"} <= set(calls)
    values, indices = calls["sfa::topk_code"]()
    assert values.shape == indices.shape == (2, 2, 4, 8)
    masked = calls["sfa::topk_code_masked"]()[2]
    assert ((masked != 0).sum(-1) == 8).all() and torch.equal(masked[masked != 0], x[masked != 0])
    assert calls["trivial custom op"]().shape == x.shape


def test_profile_finds_the_launch_path_of_the_op_only():
    x = bench.head_view(torch.device("cpu"), torch.float32)
    calls = bench.entry_points(x, 8)
    names = lambda rows: " ".join(r["function"] for r in rows)  # noqa: E731
    op_rows = bench.where_the_time_goes(calls["sfa::topk_code_masked"], calls=3, top=100_000)
    assert "topk_rows_into" in names(op_rows)
    assert "topk_rows_into" not in names(bench.where_the_time_goes(calls["aten x.mul(2)"], calls=3, top=100_000))
    assert [r["own_us"] for r in op_rows] == sorted((r["own_us"] for r in op_rows), reverse=True)
    assert all(r["calls_per_call"] > 0 for r in op_rows)


def test_host_time_is_per_call():
    ticks = []

    def one_millisecond():
        ticks.append(1)
        time.sleep(1e-3)

    us = bench.host_us(one_millisecond, calls=100, device=torch.device("cpu"))
    assert len(ticks) == 150 and 1000 <= us < 5000  # 50 warm-up calls, then 100 timed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main([])


@pytest.mark.parametrize("argv", [["--calls", "0"], ["--k", "65"]])
def test_bad_arguments_name_what_was_typed(argv, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert argv[1] in capsys.readouterr().err


def test_compiled_chains_run_the_ops_in_one_graph(monkeypatch):
    """aot_eager here (no code generation on CPU); on the GPU the default, inductor, launches the kernels."""
    torch._dynamo.reset()
    runs = []
    compute = bench.topk_kernels._compute
    monkeypatch.setattr(bench.topk_kernels, "_compute", lambda *a, **kw: runs.append(1) or compute(*a, **kw))
    x = bench.head_view(torch.device("cpu"), torch.float32)
    chains = bench.compiled_chains(x, 8, "aot_eager")
    assert [ops for _, ops in chains.values()] == [bench.CHAIN, bench.CHAIN]
    topk = next(fn for name, (fn, _) in chains.items() if "topk" in name)
    out = topk()
    assert len(runs) == bench.CHAIN  # the op ran CHAIN times in the call (the interpreter's custom op, eagerly)
    assert torch.equal(out, bench.topk_kernels.fused_topk_masked(x, 8)[1])  # the chain keeps the first top-k
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for the whole chain, compiled once
        topk()
