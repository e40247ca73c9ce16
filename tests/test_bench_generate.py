"""scripts/bench_generate.py --quick on CPU: every row of the grid is measured or says why not, the byte
accounting follows the cache formula, and HF's generate on the same weights gives the same greedy tokens."""

import importlib.util
import json

import pytest
import torch

from train_helpers import REPO

spec = importlib.util.spec_from_file_location("bench_generate", REPO / "scripts" / "bench_generate.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "generate.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    return result


def test_every_point_of_the_grid_is_measured(result):
    rows = [r for r in result["rows"] if not r["batch_label"].startswith("hf")]
    seen = {(r["model"], r["attention"], r["batch_label"], r["context"]) for r in rows}
    assert seen == {(m, a, b, c) for m in ("gpt2_tiny", "qwen3_tiny") for a in ("dense", "sfa", "short")
                    for b in ("1", "2", "max") for c in (48, 96)}
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3)
        assert r["prefill_ms"] > 0  # --quick prefills for real everywhere
        capacity = r["context"] + bench.TIMED_WARMUP + result["args"]["steps"] + 1
        assert r["cache_bytes"] == r["kv_bytes_per_token"] * r["batch"] * capacity  # what the cache allocated
        floor_bytes = r["weight_bytes"] + r["batch"] * r["context"] * r["kv_bytes_per_token"]
        assert r["floor_ms"] == pytest.approx(floor_bytes / (result["copy_gbps"] * 1e6))
        assert r["floor_ratio"] == pytest.approx(r["step_ms"] / r["floor_ms"])
        if r["attention"] != "dense" and r["batch_label"] != "max":
            assert r["vs_dense"] > 0
    assert {r["batch"] for r in rows if r["batch_label"] == "max"} == {4}  # --quick caps "max" at 4
    sfa = next(r for r in rows if r["attention"] == "sfa")
    dense = next(r for r in rows if r["attention"] == "dense" and r["model"] == sfa["model"])
    assert sfa["kv_bytes_per_token"] < dense["kv_bytes_per_token"]


def test_weight_bytes_count_what_a_step_reads():
    args = bench.parse_args(["--quick"])
    model = bench.make_model("gpt2_tiny", "dense", 64, args, torch.device("cpu"), torch.float32)
    everything = sum(p.numel() * 4 for p in model.parameters())  # tied embedding counted once
    assert bench.weight_bytes_read(model) == everything - model.transformer.wpe.weight.numel() * 4


def test_hf_generate_is_the_peer_on_the_same_weights(result):
    hf = [r for r in result["rows"] if r["batch_label"].startswith("hf")]
    for model in ("gpt2_tiny", "qwen3_tiny"):
        for attention in ("dense", "sfa"):
            peer = [r for r in hf if (r["model"], r["attention"]) == (model, attention) and r["mode"] == "hf-static"]
            ours = [r for r in hf if (r["model"], r["attention"]) == (model, attention) and r["mode"] == "eager"]
            assert len(peer) == len(ours) == 1
            assert ours[0]["same_tokens"] is True and ours[0]["vs_hf"] > 0
        short = [r for r in hf if (r["model"], r["attention"], r["mode"]) == (model, "short", "hf")]
        assert short[0]["note"].startswith("HF cannot run it: to_hf: the short-embedding baseline")
    assert any(line.startswith("ours / HF tokens/s qwen3_tiny sfa") for line in result["summary"])


def test_the_first_prefill_of_each_model_is_run_cold_before_the_timed_one(result):
    rows = [r for r in result["rows"] if not r["batch_label"].startswith("hf")]
    for model in ("gpt2_tiny", "qwen3_tiny"):
        for attention in ("dense", "sfa", "short"):
            mine = [r for r in rows if (r["model"], r["attention"]) == (model, attention)]
            assert "prefill_cold_ms" in mine[0] and mine[0]["prefill_cold_ms"] > 0
            assert not any("prefill_cold_ms" in r for r in mine[1:])


def test_a_decode_plan_override_is_parsed_or_refused_by_name(capsys):
    args = bench.parse_args(["--quick", "--decode-plan", "SPLIT_CAP=128,num_stages=3,MIN_KEYS_PER_SPLIT=0"])
    assert args.decode_plan == {"SPLIT_CAP": 128, "num_stages": 3, "MIN_KEYS_PER_SPLIT": 0}
    assert bench.parse_args(["--quick"]).decode_plan == {}
    for bad in ("SPLITCAP=128", "SPLIT_CAP=0", "num_stages=two", "SPLIT_CAP"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--quick", "--decode-plan", bad])
        assert f"--decode-plan '{bad}'" in capsys.readouterr().err


def test_the_decode_plan_override_reaches_the_kernels_launch_plan(monkeypatch):
    from sfa.kernels import decode as decode_kernel

    shipped = dict(decode_kernel.GPU_DECODE_CONFIG)
    monkeypatch.setattr(decode_kernel, "GPU_DECODE_CONFIG", dict(shipped))
    bench.apply_decode_plan({"SPLIT_CAP": 128, "num_stages": 3})
    assert decode_kernel.GPU_DECODE_CONFIG == {**shipped, "SPLIT_CAP": 128, "num_stages": 3}
