"""scripts/export_hf.py: a run directory in, a transformers directory out that runs the same attention."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers

from train_helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import export_hf  # noqa: E402


def tiny_run(root, attention):
    from training.checkpoint import save_weights
    from training.hydra_setup import compose_run_config
    from training.run_config import model_from_config

    cfg = compose_run_config(["model.n_layer=1", "model.n_head=2", "model.d_model=64", "model.max_seq_len=32",
                              "model.vocab_size=128", *attention, f"root={root}"])
    model = model_from_config(cfg).eval()
    save_weights(model, cfg, root / "run" / "checkpoints" / "step_00000003.pt")
    return root / "run", model


def test_an_sfa_run_exports_and_reloads_running_sfa(tmp_path, capsys):
    run, model = tiny_run(tmp_path, ["attention=sfa", "attention.k=4"])
    out = export_hf.main([str(run), str(tmp_path / "hf")])
    assert "step_00000003.pt (SFA k_q=4 k_k=4)" in capsys.readouterr().out
    import models.hf  # noqa: F401  registers "sfa", as the docs say to

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config._attn_implementation == "sfa"
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x)[0])


def test_what_hf_cannot_hold_is_refused_with_the_reason(tmp_path, capsys):
    run, _ = tiny_run(tmp_path, ["attention=short", "attention.d_short=8"])
    with pytest.raises(SystemExit) as stop:
        export_hf.main([str(run), str(tmp_path / "hf")])
    assert stop.value.code == 2
    assert "export_hf: to_hf: the short-embedding baseline (narrower q/k) has no HF equivalent" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
