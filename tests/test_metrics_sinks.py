"""metrics.jsonl and the wandb sink: wandb missing or failing never stops a run."""

from __future__ import annotations

import io
import json
import logging
import sys
import types
import warnings

import pytest
from omegaconf import OmegaConf

from training.optim import WarmupCosine
from training.sinks import JsonlSink, Progress, WandbSink, format_record


def logging_cfg(mode):
    return OmegaConf.create({"mode": mode, "project": "p", "entity": None, "group": None, "tags": []})


def test_disabled_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import would raise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink = WandbSink(logging_cfg("disabled"), {}, tmp_path, "run")
    sink.write({"step": 1, "loss": 1.0})
    sink.close()


def test_missing_wandb_warns_once_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(RuntimeWarning, match="wandb could not start \\(ModuleNotFoundError"):
        sink = WandbSink(logging_cfg("offline"), {}, tmp_path, "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sink.write({"step": 1, "loss": 1.0})
        sink.close()


def fake_wandb(init=None, log=None):
    module = types.ModuleType("wandb")
    module.Settings = lambda **kw: kw

    class Run:
        logged = []

        def log(self, data, step):
            if log:
                log()
            self.logged.append((step, data))

        def finish(self):
            pass

    def _init(**kwargs):
        if init:
            init()
        module.init_kwargs = kwargs
        return Run()

    module.init = _init
    return module


def test_init_failure_warns_and_goes_on(tmp_path, monkeypatch):
    def down():
        raise ConnectionError("network is down")

    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(init=down))
    with pytest.warns(RuntimeWarning, match="ConnectionError: network is down"):
        sink = WandbSink(logging_cfg("online"), {}, tmp_path, "run")
    sink.write({"step": 1, "loss": 1.0})


def test_log_failure_warns_once_then_stops_logging(tmp_path, monkeypatch):
    calls = []

    def boom():
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(log=boom))
    sink = WandbSink(logging_cfg("offline"), {"a": 1}, tmp_path, "run")
    with pytest.warns(RuntimeWarning, match="wandb.log failed \\(OSError: disk full\\)"):
        sink.write({"step": 1, "loss": 1.0})
    sink.write({"step": 2, "loss": 1.0})
    assert len(calls) == 1


def test_wandb_gets_the_mode_and_keeps_its_run_id_across_restarts(tmp_path, monkeypatch):
    fake = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    WandbSink(logging_cfg("offline"), {"a": 1}, tmp_path, "run").write({"step": 3, "loss": 2.0, "mfu": None})
    first = fake.init_kwargs
    assert first["mode"] == "offline" and first["config"] == {"a": 1} and first["dir"] == str(tmp_path)
    WandbSink(logging_cfg("offline"), {"a": 1}, tmp_path, "run")
    assert fake.init_kwargs["id"] == first["id"]


def test_jsonl_one_object_per_line_non_finite_as_null(tmp_path):
    sink = JsonlSink(tmp_path, resume_step=0)
    sink.write({"step": 1, "loss": float("nan"), "mfu": None})
    sink.write({"step": 2, "loss": 3.5})
    sink.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": None, "mfu": None}, {"step": 2, "loss": 3.5}]


def test_jsonl_after_resume_drops_records_past_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    sink = JsonlSink(tmp_path, resume_step=5)
    sink.write({"step": 6})
    sink.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    JsonlSink(tmp_path, resume_step=0).close()  # a fresh run starts an empty file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_format_record():
    line = format_record({"step": 7, "loss": 3.14159, "val_loss": 3.0, "lr": 6e-4, "mfu": 0.4123, "tokens_per_s": 12345.6})
    assert line == "step 7 | loss 3.1416 | val_loss 3.0000 | lr 6.00e-04 | tokens_per_s 12,346 | mfu 41.2%"


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup=10, decay_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(1 / 11) and s(9) == pytest.approx(10 / 11)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway down the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)


def test_conversion_losses_reach_the_console_line():
    line = format_record({"step": 2, "loss": 3.5, "lm_loss": 3.25, "match_loss": 0.0125})
    assert line == "step 2 | loss 3.5000 | lm_loss 3.2500 | match_loss 0.0125"


def test_offline_wandb_says_how_to_sync(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb())
    sink = WandbSink(logging_cfg("offline"), {}, tmp_path, "run")
    with caplog.at_level(logging.INFO, logger="train"):
        sink.close()
    assert f"upload this run with: wandb sync {tmp_path}/wandb/offline-run-*" in caplog.text


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_with_the_progress_bar_the_log_file_still_gets_every_log_every_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    # As Hydra sets it up: a console handler and train.log, both on the root logger.
    root = logging.getLogger()
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(tmp_path / "train.log")]
    for handler in handlers:
        root.addHandler(handler)
    monkeypatch.setattr(logging.getLogger("train"), "level", logging.INFO)
    try:
        progress = Progress(True, total=6, initial=0, every=2)
        assert progress.bar is not None  # the terminal got a bar
        for step in range(1, 7):
            progress.update({"step": step, "loss": 1.0, **({"val_loss": 0.5} if step == 3 else {})})
        progress.close()
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    steps = [line.split(" | ")[0] for line in (tmp_path / "train.log").read_text().splitlines()]
    assert steps == ["step 2", "step 3", "step 4", "step 6"]  # every 2nd step, and the eval step
