"""scripts/e2e_throughput.py without a GPU: every arm's train.py command is a valid config of the shape it
names, and the summary's ratios compare the right arms."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_configs import resolved
from training.run_config import check_config

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("e2e_throughput", REPO / "scripts" / "e2e_throughput.py")
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)

ARMS = [(s, a, c) for s in e2e.SHAPES for a in e2e.ATTENTION for c in (False, True)]


@pytest.mark.parametrize("shape, attention, compiled", ARMS)
def test_every_arm_is_a_valid_config_of_its_shape(shape, attention, compiled, tmp_path):
    cfg = resolved(e2e.overrides(shape, attention, compiled, 20, 40, tmp_path, eager_warmup=7))
    plan = check_config(cfg, world_size=1)
    model, train = plan.model_config, cfg["train"]
    expected = {"gpt2_1k": (12, 768, 64, 1024), "gpt2_8k": (12, 768, 64, 8192), "qwen3_1k": (12, 768, 128, 1024)}
    assert (model.n_layer, model.d_model, model.head_dim, train["seq_len"]) == expected[shape]
    assert cfg["data"]["source"] == "embedded" and cfg["model"]["preset"] == ("qwen3_tiny" if shape == "qwen3_1k" else "gpt2_small")
    assert plan.attention.kind == ("dense" if attention == "dense" else "sfa")
    if attention != "dense":
        assert plan.attention.backend == attention and plan.attention.topk_q == model.head_dim // 8
    assert train["compile"] is compiled and train["compile_backend"] == "inductor"
    assert train["time_limit_s"] == (60 if compiled else 27) and train["log_every"] == e2e.LOG_EVERY
    assert cfg["out_dir"] == str(tmp_path / e2e.arm_name(shape, attention, compiled))


def fake_run(out, shape, attention, compiled, tokens_per_s, steps=14, epilogue="unfused"):
    run = out / e2e.arm_name(shape, attention, compiled, epilogue)
    run.mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps({"device": "cpu", "attention": "sfa", "topk_q": 8}))
    # the first window (compilation) is slow; steady state after it
    records = [{"step": s, "tokens_per_s": tokens_per_s / 100 if s <= e2e.LOG_EVERY else tokens_per_s,
                "step_time_s": 1.0, "mfu": 0.3, "peak_memory_bytes": 2**30} for s in range(1, steps + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_ratios_are_against_dense_and_eager_of_the_same_shape(tmp_path):
    fake_run(tmp_path, "gpt2_1k", "dense", False, 100.0)
    fake_run(tmp_path, "gpt2_1k", "masked", False, 90.0)
    fake_run(tmp_path, "gpt2_1k", "dense", True, 125.0)
    fake_run(tmp_path, "gpt2_1k", "masked", True, 135.0)
    fake_run(tmp_path, "gpt2_8k", "masked", False, 50.0)  # no dense arm at 8k
    rows = {(r["shape"], r["attention_backend"], r["compile"]): r for r in e2e.summarize(tmp_path)}
    assert rows["gpt2_1k", "masked", False]["x_dense"] == pytest.approx(0.9)
    assert rows["gpt2_1k", "masked", True]["x_dense"] == pytest.approx(135 / 125)
    assert rows["gpt2_1k", "masked", True]["x_eager"] == pytest.approx(1.5)
    assert rows["gpt2_1k", "dense", True]["tokens_per_s"] == 125.0  # the slow first window is left out
    assert rows["gpt2_8k", "masked", False]["x_dense"] is None


def test_unfused_epilogue_arms_compare_with_their_fused_twins(tmp_path):
    fake_run(tmp_path, "qwen3_1k", "dense", False, 100.0, epilogue="fused")
    fake_run(tmp_path, "qwen3_1k", "masked", False, 95.0, epilogue="fused")
    fake_run(tmp_path, "qwen3_1k", "dense", False, 80.0)
    fake_run(tmp_path, "qwen3_1k", "masked", False, 70.0)
    rows = {(r["attention_backend"], r["qk_epilogue"]): r for r in e2e.summarize(tmp_path)}
    assert rows["masked", "fused"]["x_unfused"] == pytest.approx(95 / 70)
    assert rows["masked", "fused"]["x_dense"] == pytest.approx(0.95)
    assert rows["masked", "unfused"]["x_dense"] == pytest.approx(70 / 80)  # against dense, unfused too
    assert rows["dense", "unfused"]["x_unfused"] is None


def test_an_unfused_arm_runs_train_py_with_the_epilogue_off(tmp_path, monkeypatch):
    seen = {}

    def fake_subprocess_run(cmd, env, **kw):
        seen["env"], seen["cmd"] = env, cmd
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(e2e.subprocess, "run", fake_subprocess_run)
    args = SimpleNamespace(out=tmp_path, seconds=5, compile_warmup=0, eager_warmup=0, set=[])
    e2e.run_arm("qwen3_1k", "masked", False, "unfused", args)
    assert seen["env"]["SFA_QK_EPILOGUE"] == "off"
    assert f"out_dir={tmp_path / 'qwen3_1k-masked-eager'}" in seen["cmd"]  # the bare name: the model's default
    e2e.run_arm("qwen3_1k", "masked", False, "fused", args)
    assert seen["env"]["SFA_QK_EPILOGUE"] == "auto"
    assert f"out_dir={tmp_path / 'qwen3_1k-masked-eager-fused'}" in seen["cmd"]


def test_gpt2_shapes_run_once_whatever_the_epilogue_list(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(e2e, "run_arm", lambda shape, attention, compiled, epilogue, args: ran.append((shape, epilogue)))
    with pytest.raises(SystemExit, match="no arm with metrics"):  # nothing really ran, so nothing to summarize
        e2e.main(["--out", str(tmp_path), "--shapes", "gpt2_1k", "qwen3_1k", "--attention", "dense", "--compile", "off",
                  "--qk-epilogue", "fused", "unfused"])
    assert ran == [("gpt2_1k", "unfused"), ("qwen3_1k", "fused"), ("qwen3_1k", "unfused")]


@pytest.mark.slow
def test_the_script_runs_arms_and_writes_the_table_on_cpu(tmp_path, capsys):
    """Two arms end to end on a model small enough for the CPU (compile through aot_eager)."""
    tiny = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.max_seq_len=64", "train.seq_len=32",
            "train.micro_batch=4", "train.batch_tokens=128", "train.compile_backend=aot_eager", "train.device=cpu"]
    e2e.main(["--out", str(tmp_path), "--shapes", "gpt2_1k", "--attention", "dense", "--seconds", "4",
              "--compile-warmup", "10", "--eager-warmup", "2", "--set", *tiny])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "e2e_throughput.json").read_text())
    assert [(r["attention_backend"], r["compile"]) for r in result["rows"]] == [("dense", False), ("dense", True)]
    assert result["rows"][1]["x_eager"] > 0 and "x dense" in out and "gpt2_1k" in out
    assert not (tmp_path / "gpt2_1k-dense-eager" / "checkpoints").exists()


def test_summarize_keeps_the_versions_of_the_machine_that_ran_the_arms(tmp_path, capsys):
    fake_run(tmp_path, "qwen3_1k", "dense", True, 100.0)
    ran_on = {"torch": "2.11.0+cu130", "cuda": "13.0", "device": "NVIDIA H200", "triton": "3.6.0", "commit": "abc1234"}
    (tmp_path / "e2e_throughput.json").write_text(json.dumps({**ran_on, "seconds_per_arm": 15.0, "rows": []}))
    e2e.main(["--out", str(tmp_path), "--summarize"])
    result = json.loads((tmp_path / "e2e_throughput.json").read_text())
    assert {key: result[key] for key in ran_on} == ran_on and len(result["rows"]) == 1
    assert result["seconds_per_arm"] == 15.0  # not --seconds' default of 20
    assert "NVIDIA H200, torch 2.11.0+cu130" in capsys.readouterr().out
    (tmp_path / "e2e_throughput.json").unlink()  # without a record of the run, this machine is not passed off as it
    e2e.main(["--out", str(tmp_path), "--summarize"])
    result = json.loads((tmp_path / "e2e_throughput.json").read_text())
    assert result["device"].startswith("unknown") and result["torch"] is None and result["seconds_per_arm"] is None
    assert result["summarized_with"]["torch"] == e2e.versions()["torch"]
