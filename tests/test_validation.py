"""The validation loss (training/validation.py): the mean per target token, the same number in the training
loop's val_loss and in evaluation/perplexity.py, also on data with a loss mask."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data.loader import TokenLoader
from test_data_loss_mask import SEQ_LEN, SHARDS, make_dir

BATCH = 3  # 10 val windows of 16 tokens: batches of 3, 3, 3 and 1 windows


def tiny_model():
    from models import GPT2Config, build_model

    torch.manual_seed(0)
    model = build_model(GPT2Config(n_layer=1, n_head=2, d_model=32, max_seq_len=SEQ_LEN, vocab_size=60000), None)
    with torch.no_grad():  # larger weights than the init, so the per-token losses spread out
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def by_hand(model, data_dir):
    """(mean NLL over every unmasked target, mean of the batches' own means)."""
    nll, batch_means = [], []
    with torch.no_grad():
        for x, y in TokenLoader(data_dir, "val", BATCH, SEQ_LEN).iter_eval_batches():
            logits, _ = model(x)
            keep = y != -1
            token_nll = F.cross_entropy(logits[keep].double(), y[keep], reduction="none")
            nll.extend(token_nll.tolist())
            batch_means.append(token_nll.mean().item())
    return float(np.mean(nll)), float(np.mean(batch_means))


def test_training_and_evaluation_report_the_mean_per_target_token_on_masked_data(tmp_path):
    from types import SimpleNamespace

    from evaluation.perplexity import evaluate_loss
    from training.distributed import DistInfo
    from training.loop import evaluate  # the training loop's val_loss

    data = make_dir(tmp_path / "m", SHARDS)
    model = tiny_model()
    per_token, mean_of_means = by_hand(model, data)
    assert abs(per_token - mean_of_means) > 1e-3  # batches hold different target counts: the two differ here

    cfg = OmegaConf.create({"train": {"seq_len": SEQ_LEN, "seed": 0, "eval_batches": 4, "dtype": "fp32"}})
    info = DistInfo(mode="none", rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    run = SimpleNamespace(model=model, cfg=cfg, info=info, data_dir=data, plan=SimpleNamespace(micro_batch=BATCH),
                          autocast=contextlib.nullcontext)
    val_loss = evaluate(run)
    report = evaluate_loss(model, data, seq_len=SEQ_LEN, batch_size=BATCH, max_batches=4)
    assert val_loss == pytest.approx(per_token, rel=1e-6)
    assert report["loss"] == pytest.approx(per_token, rel=1e-6)
    assert model.training  # evaluation restores the mode it found


def test_a_split_without_targets_is_an_error_not_a_nan():
    from training.validation import token_weighted_loss

    model = tiny_model()
    x = torch.zeros(2, SEQ_LEN, dtype=torch.long)
    with pytest.raises(ValueError, match="no target tokens to evaluate on"):
        token_weighted_loss(model, [], torch.device("cpu"))
    with pytest.raises(ValueError, match="no target tokens to evaluate on"):
        token_weighted_loss(model, [(x, torch.full_like(x, -1))], torch.device("cpu"))
