"""Needle in a haystack: seeded generator, needle placement, oracle/constant scoring, training data that
TokenLoader reads, and `scripts/niah.py eval` end to end on a tiny random checkpoint."""

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import TokenLoader
from data.prepare import prepare
from data.tokenizers import get_tokenizer
from evaluation.checkpoint import load_model
from evaluation.niah import FillerHaystack, NeedleFormat, TokenHaystack, eval_samples, haystack_from_prepared, train_samples
from evaluation.niah_score import extract_number, is_exact_match, score_samples
from models import generate
from training.checkpoint import save_weights
from training.hydra_setup import compose_run_config
from training.run_config import model_from_config

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("niah_script", REPO / "scripts" / "niah.py")
niah_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(niah_script)

TOK = get_tokenizer("gpt2")
FMT = NeedleFormat()


def grid(seed=0, lengths=(64, 96), depths=(0.0, 0.3, 1.0), samples=3, haystack=None, fmt=FMT):
    return eval_samples(TOK, haystack or FillerHaystack(TOK, "."), fmt, list(lengths), list(depths), samples, seed)


def oracle_generate_fn(fmt=FMT):
    """A "model" that reads the needle out of the prompt text and answers it."""
    before, after = fmt.needle.split("{answer}")
    needle = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))

    def fn(prompts, n_new):
        rows = []
        for row in prompts.tolist():
            found = needle.search(TOK.decode(row))
            ids = TOK.encode(fmt.answer.format(answer=found.group(1))) if found else []
            rows.append((ids + [TOK.eot_token] * n_new)[:n_new])
        return torch.tensor(rows)

    return fn


def constant_generate_fn(token):
    return lambda prompts, n_new: torch.full((prompts.shape[0], n_new), token)


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = grid(seed=7), grid(seed=7), grid(seed=8)
    assert [s.to_json() for s in a] == [s.to_json() for s in b]
    assert [s.answer for s in a] != [s.answer for s in c]
    assert len({s.answer for s in a}) > len(a) // 2  # answers vary across samples
    # a cell's samples do not depend on which other cells are in the grid
    only = grid(seed=7, lengths=(96,), depths=(0.3,))
    assert [s.to_json() for s in only] == [s.to_json() for s in a if s.length == 96 and s.depth == 0.3]
    t1 = list(train_samples(TOK, FillerHaystack(TOK, "."), FMT, [64, 80], 20, seed=3))
    t2 = list(train_samples(TOK, FillerHaystack(TOK, "."), FMT, [64, 80], 20, seed=3))
    assert [s.to_json() for s in t1] == [s.to_json() for s in t2]
    assert {s.length for s in t1} == {64, 80} and len({s.depth for s in t1}) == 20


@pytest.mark.parametrize("haystack_kind", ["filler", "text"])
def test_needle_sits_at_the_requested_depth(haystack_kind):
    if haystack_kind == "filler":
        haystack = FillerHaystack(TOK, " The grass is green.")
    else:
        haystack = TokenHaystack(np.arange(1000, 3000), "ids 1000..2999")
    question = TOK.encode(FMT.question)
    for s in grid(lengths=(50, 120), depths=(0.0, 0.25, 0.5, 0.9, 1.0), haystack=haystack):
        needle = TOK.encode(FMT.needle.format(answer=s.answer))
        n_hay = s.length - len(needle) - len(question)
        assert len(s.input_ids) == s.length
        assert s.needle_start == round(s.depth * n_hay)
        assert s.input_ids[s.needle_start : s.needle_start + len(needle)] == needle == s.input_ids[s.needle_start :][: s.needle_len]
        assert s.input_ids[-len(question) :] == question
        assert s.answer_ids == TOK.encode(" " + s.answer) and len(s.answer) == 5
        hay = s.input_ids[: s.needle_start] + s.input_ids[s.needle_start + len(needle) : -len(question)]
        if haystack_kind == "text":  # one contiguous slice of the stream, cut by the needle
            assert hay == list(range(hay[0], hay[0] + n_hay))
        else:
            assert hay == (haystack.unit * s.length)[:n_hay]
    first = grid(lengths=(80,), depths=(0.0,))[0]
    last = grid(lengths=(80,), depths=(1.0,))[0]
    assert first.needle_start == 0
    assert last.needle_start + last.needle_len == 80 - len(question)


def test_oracle_scores_100_percent_and_constant_model_0():
    samples = grid(lengths=(48, 100), depths=(0.0, 0.5, 1.0), samples=4)
    oracle = score_samples(samples, oracle_generate_fn(), TOK, batch_size=3)
    assert oracle["accuracy"] == 1.0 and all(c["accuracy"] == 1.0 for c in oracle["cells"])
    assert len(oracle["cells"]) == 6 and all(c["samples"] == 4 for c in oracle["cells"])
    dot = TOK.encode(".")[0]
    constant = score_samples(samples, constant_generate_fn(dot), TOK, batch_size=5)
    assert constant["accuracy"] == 0.0
    # a constant digit answer is right only when it happens to equal the secret number: never here
    seven = score_samples(samples, constant_generate_fn(TOK.encode("7")[0]), TOK)
    assert seven["accuracy"] == 0.0


def test_exact_match_rejects_prefixes_and_extensions():
    assert extract_number(" 73914.") == "73914" and extract_number("x73914") is None
    assert is_exact_match(" 73914<|endoftext|>", "73914")
    assert not is_exact_match(" 739145", "73914")
    assert not is_exact_match(" 7391", "73914")
    assert not is_exact_match(" the number is 73914", "73914")


def test_training_data_loads_with_token_loader_and_holds_whole_samples(tmp_path):
    seq_len = 127
    meta = niah_script.main([
        "make-data", "--out", str(tmp_path / "niah"), "--seq-len", str(seq_len), "--lengths", "40,60,100",
        "--train-samples", "30", "--val-samples", "5", "--seed", "4",
    ])  # fmt: skip
    assert meta["splits"]["train"]["documents"] == 30 and meta["options"]["lengths"] == [40, 60, 100]
    loader = TokenLoader(tmp_path / "niah", "train", batch_size=4, seq_len=seq_len, shuffle=False)
    stream = [loader.read_window(i).tolist() for i in range(loader.n_windows)]  # one row per window, in stream order
    assert loader.total_tokens == len(stream) * (seq_len + 1) == meta["splits"]["train"]["windows"] * (seq_len + 1)
    expected = list(train_samples(TOK, FillerHaystack(TOK, "."), FMT, [40, 60, 100], 30, seed=4, stream=0))
    found = []
    for window in stream:
        assert window[0] == TOK.eot_token  # every window starts with a whole sample
        docs = " ".join(map(str, window)).split(str(TOK.eot_token))
        found += [[int(t) for t in d.split()] for d in docs if d.strip()]
    assert found == [s.input_ids + s.answer_ids for s in expected]
    x, y = TokenLoader(tmp_path / "niah", "val", batch_size=2, seq_len=seq_len).next_batch()
    kept = y[:, :-1] != -1  # the loss mask (answer only) hides every other target
    assert x.shape == (2, seq_len) and torch.equal(x[:, 1:][kept], y[:, :-1][kept]) and (~kept).any()


def test_make_data_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"lengths \[125\] do not fit a training window: with seq_len=127 a prompt may have at most 121"):
        niah_script.main(["make-data", "--out", str(tmp_path / "a"), "--seq-len", "127", "--lengths", "125"])
    with pytest.raises(ValueError, match="needle=.* must contain '\\{answer\\}'"):
        niah_script.main(["make-data", "--out", str(tmp_path / "b"), "--seq-len", "127", "--needle", "no digits here", "--train-samples", "3"])
    with pytest.raises(ValueError, match="train samples must be an int >= 1, got 0"):
        niah_script.main(["make-data", "--out", str(tmp_path / "c"), "--seq-len", "127", "--train-samples", "0"])
    with pytest.raises(SystemExit):
        niah_script.main(["eval", "--checkpoint", "x", "--depths", "0.5,1.5"])
    assert "depths must be numbers in [0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"length=10 is shorter than the needle \(\d+ tokens\) plus the question"):
        grid(lengths=(10,))
    with pytest.raises(ValueError, match="fewer than the"):
        grid(lengths=(200,), haystack=TokenHaystack(np.arange(50), "tiny"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("niah")
    cfg = compose_run_config([
        "model=gpt2_tiny", "model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.max_seq_len=128",
        "attention=dense", f"root={root}",
    ])  # fmt: skip
    model = model_from_config(cfg)
    return save_weights(model, cfg, root / "run" / "checkpoints" / "step_00000002.pt")


def test_eval_end_to_end_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "niah-out"
    report = niah_script.main([
        "eval", "--checkpoint", str(tiny_checkpoint), "--lengths", "48,96", "--depths", "0,1", "--samples", "2",
        "--device", "cpu", "--batch-size", "2", "--out", str(out),
    ])  # fmt: skip
    saved = json.loads((out / "niah.json").read_text())
    assert saved["accuracy"] == report["accuracy"]
    assert sorted((c["length"], c["depth"], c["samples"]) for c in saved["cells"]) == [(48, 0.0, 2), (48, 1.0, 2), (96, 0.0, 2), (96, 1.0, 2)]
    assert (out / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the recorded generation is the model's greedy continuation of that very prompt
    model, _ = load_model(tiny_checkpoint)
    sample = grid(seed=0, lengths=(96,), depths=(1.0,), samples=2)[1]
    record = next(r for r in saved["samples"] if (r["length"], r["depth"], r["index"]) == (96, 1.0, 1))
    assert record["answer"] == sample.answer
    prompt = torch.tensor([[TOK.eot_token, *sample.input_ids]])  # fed as a document: after end-of-text
    new = generate(model, prompt, len(sample.answer_ids) + 1)[0, 97:].tolist()
    assert record["generated"] == TOK.decode(new)
    assert record["correct"] == is_exact_match(record["generated"], sample.answer)


def test_eval_with_sfa_override_and_real_text_haystack(tiny_checkpoint, tmp_path):
    text = "\n\n".join(f"Paragraph {i} talks about rivers, hills and the weather on day {i}." for i in range(300))
    (tmp_path / "t.txt").write_text(text)
    data = prepare([str(tmp_path / "t.txt")], "gpt2", tmp_path / "data", val_fraction=0.5, progress=False)
    report = niah_script.main([
        "eval", "--checkpoint", str(tiny_checkpoint), "--lengths", "64", "--depths", "0.5", "--samples", "2",
        "--device", "cpu", "--attention", "sfa", "--k", "4", "--haystack-data", str(data),
    ])  # fmt: skip
    assert report["attention"]["kind"] == "sfa" and report["attention"]["topk_q"] == 4
    assert "split 'val'" in report["haystack"]
    out = tiny_checkpoint.parent.parent / "eval" / "niah-step_00000002-sfa-k4"
    assert (out / "niah.json").is_file() and (out / "niah.png").is_file()
    hay = haystack_from_prepared(data, "val", TOK)
    assert TOK.eot_token not in hay.tokens.tolist() and hay.tokens.size > 64
    with pytest.raises(ValueError, match="was tokenized with 'gpt2', but the prompts use 'qwen'"):
        haystack_from_prepared(data, "val", type("Qwen", (), {"name": "qwen"})())
    with pytest.raises(SystemExit, match="exceeds the model's max_seq_len=128"):
        niah_script.main(["eval", "--checkpoint", str(tiny_checkpoint), "--lengths", "126", "--device", "cpu"])


def test_eval_prompts_start_with_end_of_text_and_must_fit_with_it(tiny_checkpoint, tmp_path):
    from evaluation.niah_score import answer_budget

    def run(length):
        return niah_script.main([
            "eval", "--checkpoint", str(tiny_checkpoint), "--lengths", str(length), "--depths", "0.5", "--samples", "1",
            "--device", "cpu", "--out", str(tmp_path / str(length)),
        ])  # fmt: skip

    def budget(length):  # generated tokens for that length's one sample (its answer's tokens + 1)
        return answer_budget(grid(seed=0, lengths=(length,), depths=(0.5,), samples=1))

    # the longest length whose eot + prompt + generated tokens fill the 128 positions exactly, and one more
    fits = max(n for n in range(100, 127) if 1 + n + budget(n) <= 128)
    assert run(fits)["prompt_prefix"] == "eot"
    with pytest.raises(SystemExit, match=rf"longest prompt \({fits + 1} tokens\) after the leading end-of-text token"):
        run(fits + 1)  # would have fitted without the leading eot
    assert fits + 1 + budget(fits + 1) <= 128


@pytest.mark.gpu
def test_eval_on_gpu_with_sfa_decoding_over_the_compressed_cache(tiny_checkpoint, tmp_path):
    """GPU path: bf16 autocast, SFA switched on, greedy decoding through the compressed KV cache kernels."""
    report = niah_script.main([
        "eval", "--checkpoint", str(tiny_checkpoint), "--lengths", "64,120", "--depths", "0,1", "--samples", "20",
        "--batch-size", "20", "--device", "cuda", "--attention", "sfa", "--k", "8", "--out", str(tmp_path / "gpu"),
    ])  # fmt: skip
    assert report["device"].startswith("cuda") and report["dtype"] == "bfloat16"
    assert len(report["samples"]) == 80


def test_make_data_masks_exactly_each_answer_and_the_eot_after_it(tmp_path):
    seq_len = 127
    args = ["--seq-len", str(seq_len), "--lengths", "40,60,100", "--train-samples", "30", "--val-samples", "4", "--seed", "4"]
    meta = niah_script.main(["make-data", "--out", str(tmp_path / "answer"), *args])
    assert meta["options"]["loss_on"] == "answer" and all(meta["splits"][s]["loss_mask"] for s in ("train", "val"))
    tokens = np.fromfile(tmp_path / "answer" / "train_000000.bin", np.uint16).reshape(-1, seq_len + 1)
    mask = np.fromfile(tmp_path / "answer" / "train_000000.mask.bin", np.uint8).reshape(-1, seq_len + 1)
    samples = iter(train_samples(TOK, FillerHaystack(TOK, "."), FMT, [40, 60, 100], 30, seed=4, stream=0))
    # expected mask, built from the samples: walk each window's documents
    expected = np.zeros_like(mask)
    for w, window in enumerate(tokens.tolist()):
        pos = 0
        while pos < len(window) and window[pos] == TOK.eot_token and pos + 1 < len(window) and window[pos + 1] != TOK.eot_token:
            s = next(samples)
            answer_at = pos + 1 + len(s.input_ids)
            assert window[answer_at : answer_at + len(s.answer_ids)] == s.answer_ids
            expected[w, answer_at : answer_at + len(s.answer_ids)] = 1
            pos = answer_at + len(s.answer_ids)
            if pos < len(window):
                assert window[pos] == TOK.eot_token
                expected[w, pos] = 1  # the eot that ends the answer is a target too
    assert next(samples, None) is None, "every sample was found"
    np.testing.assert_array_equal(mask, expected)
    assert set(np.unique(mask).tolist()) == {0, 1}
    # the loader turns that into y = -1 everywhere but on those targets
    loader = TokenLoader(tmp_path / "answer", "train", batch_size=4, seq_len=seq_len, shuffle=False)
    ys = torch.cat([y for _, y in loader.iter_eval_batches()])
    assert torch.equal(ys != -1, torch.from_numpy(expected[:, 1:] == 1))
    decoded = {TOK.decode([t]) for t in ys[ys != -1].tolist()}
    assert "<|endoftext|>" in decoded and all(d == "<|endoftext|>" or d.strip().isdigit() for d in decoded)

    # --loss-on all: the same tokens, no mask, every target kept
    meta_all = niah_script.main(["make-data", "--out", str(tmp_path / "all"), "--loss-on", "all", *args])
    assert meta_all["options"]["loss_on"] == "all" and "loss_mask" not in meta_all["splits"]["train"]
    assert not list((tmp_path / "all").glob("*.mask.bin"))
    assert (tmp_path / "all" / "train_000000.bin").read_bytes() == (tmp_path / "answer" / "train_000000.bin").read_bytes()
    x, y = TokenLoader(tmp_path / "all", "train", 4, seq_len, shuffle=False).next_batch()
    assert (y >= 0).all() and torch.equal(x[:, 1:], y[:, :-1])


def test_make_data_rejects_an_unknown_loss_on(tmp_path, capsys):
    from evaluation.niah_data import write_training_data

    with pytest.raises(ValueError, match=r"loss_on must be one of \('answer', 'all'\) .* got 'prompt'"):
        write_training_data(tmp_path / "x", TOK, FillerHaystack(TOK, "."), FMT, seq_len=127, lengths=[40],
                            train_count=2, val_count=0, seed=0, loss_on="prompt")  # fmt: skip
    with pytest.raises(SystemExit):
        niah_script.main(["make-data", "--out", str(tmp_path / "y"), "--seq-len", "127", "--loss-on", "prompt"])
    assert "argument --loss-on: invalid choice: 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_one_per_window_gives_every_sample_its_own_window(tmp_path):
    seq_len = 127
    args = ["--seq-len", str(seq_len), "--lengths", "40", "--train-samples", "9", "--val-samples", "1", "--seed", "1"]
    packed = niah_script.main(["make-data", "--out", str(tmp_path / "packed"), *args])
    alone = niah_script.main(["make-data", "--out", str(tmp_path / "alone"), "--one-per-window", *args])
    assert packed["splits"]["train"]["windows"] < 9 and alone["splits"]["train"]["windows"] == 9
    assert alone["options"]["one_per_window"] is True and packed["options"]["one_per_window"] is False
    tokens = np.fromfile(tmp_path / "alone" / "train_000000.bin", np.uint16).reshape(9, seq_len + 1)
    mask = np.fromfile(tmp_path / "alone" / "train_000000.mask.bin", np.uint8).reshape(9, seq_len + 1)
    for s, row, row_mask in zip(train_samples(TOK, FillerHaystack(TOK, "."), FMT, [40], 9, seed=1), tokens, mask):
        end = 1 + len(s.input_ids) + len(s.answer_ids)
        assert row[:end].tolist() == [TOK.eot_token, *s.input_ids, *s.answer_ids]
        assert (row[end:] == TOK.eot_token).all()
        assert np.flatnonzero(row_mask).tolist() == list(range(end - len(s.answer_ids), end + 1))  # answer + eot


def test_summarize_pools_depths_per_length_and_reads_the_run(tiny_checkpoint, tmp_path, capsys):
    run_dir = tiny_checkpoint.parent.parent
    (run_dir / "config.yaml").write_text("model:\n  preset: gpt2_tiny\ntrain:\n  seq_len: 128\n")
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "tokens": 10, "loss": 9.0, "elapsed_s": 1.0, "val_loss": 8.5}) + "\n"
        + json.dumps({"step": 2, "tokens": 20, "loss": 7.0, "elapsed_s": 2.0}) + "\n"
    )  # fmt: skip
    niah_script.main([
        "eval", "--checkpoint", str(tiny_checkpoint), "--lengths", "48,96", "--depths", "0,0.5,1", "--samples", "2",
        "--device", "cpu", "--out", str(tmp_path / "ev"),
    ])  # fmt: skip
    report = json.loads((tmp_path / "ev" / "niah.json").read_text())
    # a perfect evaluation of the same run, written by hand, to tell rows apart
    perfect = {**report, "cells": [{**c, "correct": c["samples"], "accuracy": 1.0} for c in report["cells"]], "accuracy": 1.0}
    (tmp_path / "perfect").mkdir()
    (tmp_path / "perfect" / "niah.json").write_text(json.dumps(perfect))
    capsys.readouterr()
    summary = niah_script.main(["summarize", "--out", str(tmp_path / "s.json"), str(tmp_path / "ev"), str(tmp_path / "perfect" / "niah.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == summary and summary["lengths"] == [48, 96]
    first, second = summary["runs"]
    for n in (48, 96):
        cells = [c for c in report["cells"] if c["length"] == n]
        assert first["by_length"][str(n)] == {
            "correct": sum(c["correct"] for c in cells), "samples": 6, "accuracy": sum(c["correct"] for c in cells) / 6
        }  # fmt: skip
        assert second["by_length"][str(n)]["accuracy"] == 1.0
    assert (first["label"], first["train_seq_len"], first["steps"], first["final_loss"], first["val_loss"]) == ("dense", 128, 2, 7.0, 8.5)
    table = capsys.readouterr().out
    assert "      48      96" in table and "100%    100%    100%" in table
    with pytest.raises(SystemExit, match=r"niah summarize: .*nowhere does not exist \(run `scripts/niah.py eval` first\)"):
        niah_script.main(["summarize", "--out", str(tmp_path / "t.json"), str(tmp_path / "nowhere")])


@pytest.mark.slow
def test_study_script_runs_end_to_end_and_skips_finished_steps(tmp_path):
    """scripts/niah_study.sh with NIAH_SMOKE=1 at one context: data, dense + SFA training, eval, summary."""
    import os
    import subprocess

    env = {**os.environ, "NIAH_SMOKE": "1", "NIAH_CONTEXTS": "128", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    run = lambda: subprocess.run(["bash", str(REPO / "scripts" / "niah_study.sh"), str(tmp_path / "study")], env=env,  # noqa: E731
                                 capture_output=True, text=True, timeout=240)  # fmt: skip
    first = run()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert [(r["label"], r["train_seq_len"], r["steps"]) for r in summary["runs"]] == [("dense", 128, 3), ("sfa k=8", 128, 3)]
    assert summary["lengths"] == [64, 120] and all(r["by_length"]["64"]["samples"] == 2 for r in summary["runs"])
    # trained on the answer-only loss: finite train and val losses (no all-masked micro-batch)
    assert all(np.isfinite(r["final_loss"]) and np.isfinite(r["val_loss"]) for r in summary["runs"])
    meta = json.loads((tmp_path / "study" / "data-128" / "meta.json").read_text())
    assert meta["options"]["loss_on"] == "answer" and meta["options"]["one_per_window"] is True
    study = tmp_path / "study"
    dense_checkpoint = next((study / "128-dense" / "run" / "checkpoints").glob("*.pt"))
    stamp = dense_checkpoint.stat().st_mtime_ns
    # Rerun: finished steps are skipped. Pretend the SFA arm did not finish and dense stopped (by its time
    # limit) at step 2: SFA is retrained for exactly dense's steps, dense is left alone.
    (study / "128-sfa" / "run" / ".done").unlink()
    metrics = (study / "128-dense" / "run" / "metrics.jsonl").read_text().splitlines()
    (study / "128-dense" / "run" / "metrics.jsonl").write_text("\n".join(metrics[:2]) + "\n")
    # an arm evaluated by an earlier call (another context) joins the summary: fake one by copying an eval
    shutil.copytree(study / "128-dense" / "eval", study / "1024-dense" / "eval")
    again = run()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "train dense" not in again.stdout and "eval dense" not in again.stdout and "train sfa" in again.stdout
    assert dense_checkpoint.stat().st_mtime_ns == stamp
    rows = json.loads((study / "summary.json").read_text())["runs"]
    assert [Path(r["niah_json"]).parent.parent.name for r in rows] == ["128-dense", "128-sfa", "1024-dense"]
    assert [r["steps"] for r in rows] == [2, 2, 2]  # SFA ran as many steps as dense's (now 2)
