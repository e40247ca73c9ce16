"""scripts/profile_generate.py: the kernel classes of a profiled decode step add up to the step's kernel time,
a CPU step (--quick) runs the model's ops as many times per step as its layers imply, kernel names land in
the class they belong to, and bad input stops it with one clear line. The GPU test checks that the profiler
sees inside the CUDA graph: a replayed step shows the eager step's kernels."""

import importlib.util
import json
import re

import pytest
import torch

from train_helpers import REPO

spec = importlib.util.spec_from_file_location("profile_generate", REPO / "scripts" / "profile_generate.py")
prof = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prof)



RUNS = {"dense": ["--attention", "dense"], "sfa": ["--attention", "sfa"], "dense_topp": ["--sampler", "topp"]}
N_LAYER = 2  # --quick's qwen3_tiny is cut to 2 layers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    results = {}
    for name, argv in RUNS.items():
        path = out / f"{name}.json"
        results[name] = prof.main(["--quick", *argv, "--out", str(path)])
        assert json.loads(path.read_text()) == json.loads(json.dumps(results[name]))
    return results


def counts(result) -> dict:
    """{(op name, class): ops per step}"""
    return {(k["name"], k["kernel_class"]): k["count"] for k in result["by_name"]}


def test_classes_add_up_to_the_step(runs):
    for r in runs.values():
        classes = r["classes"]
        assert list(classes) == list(prof.LABELS)
        assert sum(c["ms"] for c in classes.values()) == pytest.approx(r["kernel_ms"], rel=1e-9)
        assert sum(c["count"] for c in classes.values()) == r["kernels"]
        assert sum(c["share"] for c in classes.values()) == pytest.approx(1.0, rel=1e-9)
        assert sum(k["ms"] for k in r["by_name"]) == pytest.approx(r["kernel_ms"], rel=1e-9)
        assert r["kernel_ms"] > 0 and r["wall_ms"] > 0
        assert r["gap_ms"] == pytest.approx(r["wall_ms"] - r["kernel_ms"])
        largest = [k["ms"] for k in r["largest"]]
        assert largest == sorted(largest, reverse=True) and len(largest) == 10
        assert r["positional"] is True and 0 < r["lm_head_ms"] < classes["gemm"]["ms"]


def test_a_cpu_step_runs_each_op_as_often_as_the_model_implies(runs):
    """7 projections per layer + the LM head, one attention per layer, keys (SFA: their values and indices)
    and values written per layer plus the new token; the sampler's ops after the LM head, SFA's sorts (q's
    mask, the new keys' code) before it."""
    for name, r in runs.items():
        c, ops = r["classes"], counts(r)
        assert c["gemm"]["count"] == ops[("aten::linear", "gemm")] == 7 * N_LAYER + 1
        assert c["attention"]["count"] == N_LAYER
        assert ops[("aten::index_copy_", "cache_write_copy")] == (3 if name == "sfa" else 2) * N_LAYER
        assert ops[("aten::index_copy_", "sampling")] == 1  # the new token, written after the sampler
        assert r["breakdown_mode"] == "eager" and r["note"] == ""
    dense, sfa, topp = counts(runs["dense"]), counts(runs["sfa"]), counts(runs["dense_topp"])
    assert dense[("aten::argmax", "sampling")] == sfa[("aten::argmax", "sampling")] == 1
    assert not any(cls == "sfa_topk" for _, cls in dense) and not any(cls == "sfa_topk" for _, cls in topp)
    assert sfa[("aten::sort", "sfa_topk")] == 4 * N_LAYER and ("aten::sort", "sampling") not in sfa
    assert topp[("aten::sort", "sampling")] == 1 and topp[("aten::softmax", "sampling")] >= 1
    assert runs["dense_topp"]["classes"]["sampling"]["count"] > runs["dense"]["classes"]["sampling"]["count"]


def test_floors_follow_the_byte_formula(runs):
    r = runs["dense"]
    args = prof.parse_args(["--quick"])
    model = prof.make_model(args.model, "dense", 64, args, torch.device("cpu"), torch.float32)
    f, gbps = r["floors"], r["copy_gbps"]
    assert f["weight_bytes"] == prof.weight_bytes_read(model)
    assert f["context_bytes"] == args.batch * args.context * model.kv_cache_bytes_per_token(torch.float32)
    assert f["step_ms"] == pytest.approx((f["weight_bytes"] + f["context_bytes"]) / (gbps * 1e6))
    assert f["gemm_ms"] == pytest.approx(f["weight_bytes"] / (gbps * 1e6))
    assert f["cache_ms"] == pytest.approx(f["context_bytes"] / (gbps * 1e6))


@pytest.mark.parametrize("name, cls", [
    # cuBLAS / cuBLASLt GEMMs and GEMVs
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)", "gemm"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "gemm"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, false>", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>", "gemm"),
    ("triton_tem_fused_mm_4", "gemm"),
    # the split-KV decode kernels (Triton names them after the function)
    ("_decode_split_kernel", "attention"),
    ("_combine_kernel", "combine"),
    ("_topk_rows_kernel", "sfa_topk"),
    # ATen: the functor in the template says what ran
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::ArgMaxOps<c10::BFloat16>, "
     "unsigned int, long, 4, 4> >(at::native::ReduceOp<c10::BFloat16, at::native::ArgMaxOps<c10::BFloat16>>)",
     "sampling"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::Epilogue>",
     "sampling"),
    # by name a sort is SFA's selection; the sampler's sorts become "sampling" by their place after the LM head
    ("void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::DeviceRadixSortPolicy>",
     "sfa_topk"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
     "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>", "cache_write_copy"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
     "index_copy_kernel_impl<c10::BFloat16>>>", "cache_write_copy"),
    ("Memcpy DtoD (Device -> Device)", "cache_write_copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "norm_rope_elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2>>",
     "norm_rope_elementwise"),
    ("void at::native::(anonymous namespace)::indexSelectSmallIndex<c10::BFloat16, long, unsigned int, 2, 2, -2>",
     "norm_rope_elementwise"),
    # inductor: "_to_copy" in a fused name is a cast inside a norm, index_put a cache write
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm_rope_elementwise"),
    ("triton_poi_fused_index_put_3", "cache_write_copy"),
    ("triton_red_fused_argmax_7", "sampling"),
    # ... classed by their own work, not by the custom ops their names mention (names from an H200 profile)
    ("triton_per_fused__fused_rms_norm__to_copy__unsafe_view_add_cat_dense_decode_attention_index_select_m",
     "norm_rope_elementwise"),
    ("triton_per_fused__fused_rms_norm__to_copy__unsafe_view_add_cat_index_select_mm_mul_neg_split_topk_code_masked_"
     "transpose_view_2", "norm_rope_elementwise"),
    ("triton_per_fused__fused_rms_norm__to_copy__unsafe_view_add_cat_index_copy_index_select_mm_mul_neg_sp",
     "cache_write_copy"),
    ("triton_tem_fused_mm_dense_decode_attention_5", "gemm"), ("triton_per_fused_sort_3", "sfa_topk"),
    ("triton_for_fused__to_copy_0", "norm_rope_elementwise"),
    # CPU: aten ops
    ("aten::linear", "gemm"), ("aten::scaled_dot_product_attention", "attention"),
    ("aten::rms_norm", "norm_rope_elementwise"),
    ("aten::index_copy_", "cache_write_copy"), ("aten::argmax", "sampling"), ("aten::view", "other"),
])
def test_kernel_names_land_in_their_class(name, cls):
    assert prof.kernel_class(name) == cls


def test_device_events_count_kernels_copies_and_memsets_only():
    trace = [dict(ph="X", cat="kernel", name="a", ts=0.0, dur=2.0),
             dict(ph="X", cat="gpu_memcpy", name="Memcpy", ts=2, dur=1),
             dict(ph="X", cat="gpu_memset", name="Memset", ts=3, dur=1),
             dict(ph="X", cat="gpu_user_annotation", name="step", ts=0, dur=4),  # spans kernels: would count them twice
             dict(ph="X", cat="cuda_runtime", name="cudaGraphLaunch", ts=0, dur=1),
             dict(ph="f", cat="ac2g", name="x", ts=0)]
    assert [e["name"] for e in prof.device_activity(trace)] == ["a", "Memcpy", "Memset"]


def test_cpu_ops_count_once_at_the_top_level():
    trace = [dict(ph="X", cat="cpu_op", name="aten::linear", ts=0.0, dur=10.0, pid=1, tid=1),
             dict(ph="X", cat="cpu_op", name="aten::addmm", ts=1.0, dur=8.0, pid=1, tid=1),  # inside linear
             dict(ph="X", cat="cpu_op", name="aten::add", ts=10.0, dur=1.0, pid=1, tid=1),
             dict(ph="X", cat="cpu_op", name="aten::mul", ts=2.0, dur=1.0, pid=1, tid=2),  # another thread
             dict(ph="X", cat="user_annotation", name="step", ts=0.0, dur=20.0, pid=1, tid=1)]
    assert sorted(e["name"] for e in prof.top_level_ops(trace)) == ["aten::add", "aten::linear", "aten::mul"]


def test_breakdown_cuts_the_steps_and_finds_the_lm_head():
    """Two steps of the same 8 kernels (times in us): the last GEMM run is the LM head (GEMM + split-K
    reduce), what follows it is sampling, whatever its name; a sort before it is SFA's."""
    step = [("_decode_split_kernel", 30), ("bitonicSortKVInPlace", 4), ("nvjet_qkv", 50),
            ("vectorized_elementwise_kernel", 2),
            ("nvjet_lm_head", 40), ("splitKreduce_kernel", 5), ("DeviceRadixSortOnesweepKernel", 8),
            ("vectorized_elementwise_kernel", 1)]
    events, ts = [], 0.0
    for _ in range(2):
        for name, dur in step:
            events.append(dict(name=name, ts=ts, dur=float(dur)))
            ts += dur + 1.0  # 1 us idle after every kernel
    b = prof.breakdown(events[::-1], steps=2)  # the trace's order is not the time order
    assert b["positional"] is True and b["kernels"] == 8
    assert b["kernel_ms"] == pytest.approx(0.140) and b["span_ms"] == pytest.approx((2 * 148 - 1) / 2 / 1e3)
    assert b["lm_head_ms"] == pytest.approx(0.045)
    got = {c: (v["count"], round(v["ms"] * 1e3, 6)) for c, v in b["classes"].items() if v["count"]}
    assert got == {"attention": (1, 30), "sfa_topk": (1, 4), "gemm": (3, 95), "norm_rope_elementwise": (1, 2),
                   "sampling": (2, 9)}
    assert b["classes"]["gemm"]["share"] == pytest.approx(95 / 140)
    names = {(k["name"], k["kernel_class"]) for k in b["by_name"]}
    assert ("vectorized_elementwise_kernel", "sampling") in names and ("vectorized_elementwise_kernel",
                                                                       "norm_rope_elementwise") in names


def test_breakdown_by_name_alone_when_steps_do_not_cut_evenly():
    events = [dict(name="nvjet_x", ts=0.0, dur=10.0), dict(name="DeviceRadixSortOnesweepKernel", ts=20.0, dur=5.0),
              dict(name="odd_kernel", ts=30.0, dur=1.0)]
    b = prof.breakdown(events, steps=2)
    assert b["positional"] is False and b["lm_head_ms"] is None and b["kernels"] == 1.5
    assert b["classes"]["sampling"]["count"] == 0 and b["classes"]["sfa_topk"]["count"] == 0.5
    assert b["other_names"] == ["odd_kernel"]


@pytest.mark.parametrize("flag, value, expected", [
    # argparse quotes the choices from Python 3.12 on
    ("--attention", "sparse",
     r"argument --attention: invalid choice: 'sparse' \(choose from '?dense'?, '?sfa'?, '?short'?\)"),
    ("--mode", "cuda-graph",
     r"argument --mode: invalid choice: 'cuda-graph' \(choose from '?graph'?, '?eager'?, '?compile'?\)"),
    ("--steps", "0", r"--steps must be >= 1, got 0"),
])
def test_bad_arguments_stop_with_one_clear_line(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prof.main(["--quick", flag, value])
    assert exit_info.value.code == 2
    assert re.fullmatch(r"profile_generate.py: error: " + expected, capsys.readouterr().err.strip().splitlines()[-1])


def test_graph_mode_off_cuda_says_what_to_use():
    with pytest.raises(SystemExit, match=r"^profile_generate.py: decode mode='graph' captures CUDA graphs; the model "
                                         r"is on cpu \(use mode='eager'\)$"):
        prof.main(["--quick", "--mode", "graph"])


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["dense", "sfa"])
def test_the_profiler_sees_inside_the_cuda_graph(attention):
    """The replayed graph runs the eager step's kernels: one split-KV decode kernel and one combine per layer,
    at least one GEMM kernel per projection and the LM head, and every non-GEMM class as often as in eager
    mode (GEMMs may differ: cuBLAS may choose another split-K under capture). A small Qwen3 in bf16."""
    argv = ["--model", "qwen3_tiny", "--attention", attention, "--context", "4096", "--steps", "4", "--device", "cuda"]
    graph, eager = prof.main([*argv, "--mode", "graph"]), prof.main([*argv, "--mode", "eager"])
    assert graph["breakdown_mode"] == "graph", graph["note"]
    layers = 4  # qwen3_tiny
    for r in (graph, eager):
        assert r["positional"] is True
        assert r["classes"]["attention"]["count"] == r["classes"]["combine"]["count"] == layers
        assert r["classes"]["gemm"]["count"] >= 7 * layers + 1
    assert ({c: v["count"] for c, v in graph["classes"].items() if c != "gemm"}
            == {c: v["count"] for c, v in eager["classes"].items() if c != "gemm"})
    assert graph["wall_ms"] < eager["wall_ms"]
