"""scripts/eval_ppl.py: loss and perplexity of a tiny checkpoint on tiny prepared data, checked against
a by-hand recomputation from the model's logits over the same windows."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.format import open_shards
from data.prepare import prepare
from evaluation.checkpoint import load_model
from training.checkpoint import save_weights
from training.hydra_setup import compose_run_config
from training.run_config import model_from_config

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 32


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_ppl = load_script("eval_ppl")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny prepared data (a local text file) and a tiny dense GPT-2 checkpoint saved like train.py's."""
    root = tmp_path_factory.mktemp("ppl")
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat tree red blue big small quickly slowly".split()
    docs = [" ".join(rng.choice(words, size=int(rng.integers(20, 60)))) + "." for _ in range(60)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    data_dir = prepare([str(root / "corpus.txt")], "gpt2", root / "data", val_fraction=0.3, progress=False)
    cfg = compose_run_config([
        "model=gpt2_tiny", "model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.max_seq_len=64",
        "attention=dense", f"train.seq_len={SEQ_LEN}", f"root={root}",
    ])  # fmt: skip
    torch.manual_seed(0)
    model = model_from_config(cfg)
    with torch.no_grad():  # larger random weights than GPT-2's init, so the attention pattern moves the loss
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() == 2 else None
    ckpt = save_weights(model, cfg, root / "run" / "checkpoints" / "step_00000001.pt")
    return root, data_dir, ckpt, cfg


def by_hand_losses(model, data_dir, n_windows=None):
    """Per-token NLLs over consecutive non-overlapping windows of SEQ_LEN + 1 val tokens."""
    stream = np.concatenate([np.asarray(s, dtype=np.int64) for s in open_shards(data_dir, "val")])
    count = len(stream) // (SEQ_LEN + 1) if n_windows is None else n_windows
    nll = []
    with torch.no_grad():
        for w in range(count):
            window = torch.from_numpy(stream[w * (SEQ_LEN + 1) : (w + 1) * (SEQ_LEN + 1)])
            logits, _ = model(window[None, :-1])
            logp = F.log_softmax(logits[0].double(), dim=-1)
            nll.extend((-logp[torch.arange(SEQ_LEN), window[1:]]).tolist())
    return nll


def run(workdir, *extra):
    root, data_dir, ckpt, _ = workdir
    return eval_ppl.main(["--checkpoint", str(ckpt), "--data", str(data_dir), "--batch-size", "3", "--device", "cpu", *extra])


def test_perplexity_is_exp_of_mean_loss_recomputed_by_hand(workdir, tmp_path):
    _, data_dir, ckpt, _ = workdir
    out = tmp_path / "ppl.json"
    report = run(workdir, "--out", str(out))
    model, _ = load_model(ckpt)
    nll = by_hand_losses(model, data_dir)
    assert report["tokens"] == len(nll) > 3 * SEQ_LEN * 2  # several batches, the last one may be short
    assert report["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert json.loads(out.read_text())["perplexity"] == report["perplexity"]
    assert report["seq_len"] == SEQ_LEN  # taken from the run's train.seq_len


def test_batches_limits_the_tokens_read(workdir, tmp_path):
    _, data_dir, ckpt, _ = workdir
    report = run(workdir, "--batches", "2", "--out", str(tmp_path / "p.json"))
    model, _ = load_model(ckpt)
    nll = by_hand_losses(model, data_dir, n_windows=6)
    assert report["batches"] == 2 and report["tokens"] == 6 * SEQ_LEN
    assert report["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)


def test_sfa_switched_on_a_dense_checkpoint(workdir, tmp_path):
    _, data_dir, ckpt, cfg = workdir
    dense = run(workdir, "--batches", "2", "--out", str(tmp_path / "d.json"))
    sparse = run(workdir, "--batches", "2", "--attention", "sfa", "--k", "4", "--out", str(tmp_path / "s.json"))
    assert sparse["attention"]["kind"] == "sfa" and sparse["attention"]["topk_q"] == 4 and sparse["attention_override"]
    model, _ = load_model(ckpt, attention={"kind": "sfa", "topk_q": 4})
    nll = by_hand_losses(model, data_dir, n_windows=6)
    assert sparse["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert abs(sparse["loss"] - dense["loss"]) > 1e-2
    # k = head dim keeps every coordinate: SFA reduces to dense attention exactly.
    full = run(workdir, "--batches", "2", "--attention", "sfa", "--k", "32", "--out", str(tmp_path / "f.json"))
    assert full["loss"] == pytest.approx(dense["loss"], rel=1e-6)


def test_masked_data_weights_by_the_unmasked_targets(workdir, tmp_path):
    """On data with a loss mask (e.g. NIAH answer-only), the loss is the mean NLL over unmasked targets."""
    import shutil

    from data.format import mask_name, read_meta, write_meta

    root, data_dir, ckpt, _ = workdir
    masked = tmp_path / "masked"
    shutil.copytree(data_dir, masked)
    meta = read_meta(masked)
    rng = np.random.default_rng(3)
    stream_mask = []
    for shard in meta["splits"]["val"]["shards"]:
        bits = rng.integers(0, 2, size=shard["tokens"]).astype(np.uint8)
        bits[:: SEQ_LEN // 2] = 1  # every window keeps some targets (the loader refuses empty windows)
        bits.tofile(masked / mask_name(shard["file"]))
        stream_mask.append(bits)
    meta["splits"]["val"]["loss_mask"] = True
    write_meta(masked, meta)
    stream_mask = np.concatenate(stream_mask)
    model, _ = load_model(ckpt)
    nll = np.asarray(by_hand_losses(model, data_dir))
    n_windows = len(nll) // SEQ_LEN
    target_mask = np.concatenate([stream_mask[w * (SEQ_LEN + 1) + 1 : (w + 1) * (SEQ_LEN + 1)] for w in range(n_windows)])
    assert 0 < target_mask.sum() < len(target_mask)
    report = eval_ppl.main(["--checkpoint", str(ckpt), "--data", str(masked), "--batch-size", "3", "--device", "cpu",
                            "--out", str(tmp_path / "m.json")])
    assert report["tokens"] == int(target_mask.sum())
    assert report["loss"] == pytest.approx(float(nll[target_mask == 1].mean()), rel=1e-5)


def test_default_output_goes_to_the_run_dir(workdir):
    root, _, _, _ = workdir
    report = run(workdir, "--batches", "1", "--attention", "sfa", "--k", "8")
    assert (root / "run" / "eval" / "ppl-step_00000001-val-sfa-k8.json").is_file()
    assert report["tokens"] == 3 * SEQ_LEN


def test_errors_name_the_problem(workdir, tmp_path, capsys):
    root, data_dir, ckpt, cfg = workdir
    with pytest.raises(ValueError, match="--k needs --attention sfa"):
        run(workdir, "--k", "8")
    with pytest.raises(ValueError, match="--attention sfa needs --k"):
        run(workdir, "--attention", "sfa")
    with pytest.raises(SystemExit):
        run(workdir, "--batches", "0")
    assert "--batches must be a positive integer or 'all'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        eval_ppl.main(["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(data_dir)])
    with pytest.raises(ValueError, match=r"seq_len=128 must be an int in \[1, the model's max_seq_len=64\]"):
        run(workdir, "--seq-len", "128")
    qwen_cfg = {**cfg, "data": {**cfg["data"], "tokenizer": "qwen"}}
    other = save_weights(load_model(ckpt)[0], qwen_cfg, tmp_path / "qwen" / "step_00000001.pt")
    with pytest.raises(SystemExit, match="tokenized with 'gpt2' but the model was trained with 'qwen'"):
        eval_ppl.main(["--checkpoint", str(other), "--data", str(data_dir)])
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="has no checkpoints/step_"):
        eval_ppl.main(["--checkpoint", str(tmp_path / "empty_run"), "--data", str(data_dir)])
    with pytest.raises(ValueError, match="attention override changes the model's parameters"):
        load_model(ckpt, attention={"kind": "short", "d_short": 8})
    with pytest.raises(ValueError, match="--attention must be 'sfa' or 'dense'"):
        from evaluation.checkpoint import attention_override

        attention_override("short")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        torch.save({"weights": {}}, tmp_path / "foreign.pt")
        eval_ppl.main(["--checkpoint", str(tmp_path / "foreign.pt"), "--data", str(data_dir)])


@pytest.mark.slow
def test_reads_a_real_train_py_checkpoint_and_matches_its_val_loss(tmp_path):
    """Two steps of the real train.py (tiny model, embedded corpus), then eval_ppl on its run directory with
    the defaults (the run's data and seq_len): on the windows train.py validates on, the loss is its val_loss."""
    import subprocess
    import sys

    overrides = [
        "model.n_layer=1", "model.d_model=64", "model.n_head=2", "train.max_steps=2", "optim.warmup_steps=1",
        "train.eval_every=0", "train.ckpt_every=0", "train.seq_len=32", "train.batch_tokens=128", "train.micro_batch=4",
        "train.eval_batches=3", f"root={tmp_path}", "run_name=tiny",
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    report = eval_ppl.main(["--checkpoint", str(run_dir), "--batches", "3", "--batch-size", "4", "--device", "cpu"])
    assert report["seq_len"] == 32 and report["tokens"] == 3 * 4 * 32
    assert report["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert (run_dir / "eval" / "ppl-step_00000002-val.json").is_file()
