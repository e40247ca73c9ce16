"""scripts/profile_train.py: a CPU run (--quick) profiles the real loop's steps for dense and SFA, the classes add up
to the kernel time, SFA's top-k shows where dense has none, GPU kernel names land in the class they belong to, and
bad input stops it with one clear line."""

import importlib.util
import json

import pytest

from train_helpers import REPO

spec = importlib.util.spec_from_file_location("profile_train", REPO / "scripts" / "profile_train.py")
prof = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prof)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile_train") / "out.json"
    out = prof.main(["--quick", "--out", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(out))
    return out


def test_classes_add_up_and_sfa_adds_its_selection(result):
    arms = {a["attention"]: a for a in result["arms"]}
    assert list(arms) == ["dense", "reference"] and arms["reference"]["k"] == 4 and arms["dense"]["k"] is None
    for a in arms.values():
        assert list(a["classes"]) == list(prof.CLASSES)
        assert sum(c["ms"] for c in a["classes"].values()) == pytest.approx(a["kernel_ms"], rel=1e-9)
        assert sum(c["count"] for c in a["classes"].values()) == a["kernels"]
        assert a["wall_ms"] > 0 and a["tokens_per_s"] > 0 and a["host_ops"]
    # the reference selection sorts |q| and |k| (two sorts per tensor, per layer: 4 layers, 1 micro-batch)
    sorts = sum(e["count"] for e in arms["reference"]["by_name"] if e["name"] == "aten::sort")
    assert sorts == 4 * 2 * 2
    assert not any(e["name"] == "aten::sort" for e in arms["dense"]["by_name"])


@pytest.mark.parametrize("name,cls", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("triton_tem_fused_mm_0", "gemm"),
    ("_topk_rows_kernel", "sfa_kernels"),
    ("flash_bwd_dkdv_kernel", "sfa_kernels"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("triton_poi_fused__to_copy_add_scatter_zeros_12", "scatter_gather"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_",
     "copy"),
    ("triton_red_fused__log_softmax__to_copy__unsafe_view_prepare_softmax_online_view_18", "loss"),
    ("triton_per_fused__to_copy_add_native_layer_norm_backward_view_9", "compiled_elementwise"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamW>", "optimizer"),
])
def test_kernel_names_land_in_their_class(name, cls):
    assert prof.kernel_class(name) == cls


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "--steps must be >= 1"),
                                          (["--shape", "gpt2_2k"], "invalid choice")])
def test_bad_arguments_stop_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        prof.parse_args(argv)
    assert message in capsys.readouterr().err
