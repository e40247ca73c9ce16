"""Dense -> SFA conversion (training/conversion.py): the Eq. 8 match loss, initial weights from HF and from
our checkpoints, refusals, data.dir, and a conversion run through train.py that restarts by resuming."""

from __future__ import annotations

import pytest
import torch
import yaml

from models import build_model, to_hf
from training.checkpoint import CheckpointError, load_weights, save_weights
from training.conversion import EXTRA_TARGET_SUFFIXES, ConversionError, initialize_from, match_loss, training_loss
from training.hydra_setup import compose_run_config
from training.run_config import ConfigError, MatchLoss, check_config, check_init, model_config, parse_match_loss, run_data_dir

# Two 32-wide heads: k = 32 keeps every coordinate, so SFA must reproduce dense attention exactly.
GPT2_DIMS = dict(n_layer=2, d_model=64, n_head=2)
QWEN3_DIMS = dict(n_layer=2, d_model=64, n_head=2, n_kv_head=1, head_dim=32, intermediate_size=96)


def sfa(k: int, **extra) -> dict:
    return {"kind": "sfa", "topk_q": k, "backend": "reference", **extra}


def tokens(batch=2, length=16, vocab=50304):
    x = torch.randint(0, vocab, (batch, length))
    return x, torch.roll(x, -1, dims=1)


def run_config(preset: str, dims: dict) -> dict:
    """The fields of a run config that read_checkpoint / initialize_from use."""
    return {"model": {"preset": preset, "tokenizer": "gpt2", **dims}, "attention": {"kind": "dense"}}


def save_ours(model, preset, dims, path):
    return save_weights(model, run_config(preset, dims), path)


# --- the loss ---------------------------------------------------------------------------------------
def test_match_loss_is_the_head_mean_of_per_head_mean_squared_errors():
    model = build_model("gpt2_tiny", sfa(8), **GPT2_DIMS)
    x, y = tokens()
    _, _, pairs = model(x, y, return_attention_pairs=True)
    assert len(pairs) == 2

    def by_hand(layer):
        sfa_out, dense_out = pairs[layer]
        heads = [((sfa_out[:, h] - dense_out[:, h]) ** 2).sum() / sfa_out[:, h].numel() for h in range(sfa_out.shape[1])]
        return sum(heads) / len(heads)

    assert by_hand(0) > 0 and by_hand(1) > 0  # k=8 of 32 really differs from dense
    torch.testing.assert_close(match_loss(pairs), (by_hand(0) + by_hand(1)) / 2)
    torch.testing.assert_close(match_loss(pairs, (1,)), by_hand(1))


def test_the_dense_target_gets_no_gradient():
    model = build_model("gpt2_tiny", sfa(8), **GPT2_DIMS)
    x, y = tokens()
    _, _, pairs = model(x, y, return_attention_pairs=True)
    assert all(s.requires_grad and not d.requires_grad for s, d in pairs)
    # match_loss itself stops gradients too, even for a target that would carry them.
    s, d = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 4, 5, requires_grad=True)
    match_loss([(s, d)]).backward()
    assert d.grad is None
    torch.testing.assert_close(s.grad, 2 * (s - d).detach() / s.numel())


def test_zero_weight_is_exactly_the_plain_lm_loss_and_a_positive_weight_adds_the_match_term():
    model = build_model("gpt2_tiny", sfa(8), **GPT2_DIMS)
    x, y = tokens()
    _, plain = model(x, y)
    loss, parts = training_loss(model, x, y, MatchLoss(0.0))
    assert parts is None and torch.equal(loss, plain)

    loss, parts = training_loss(model, x, y, MatchLoss(2.5, (0,)))
    _, _, pairs = model(x, y, return_attention_pairs=True)
    assert torch.equal(parts["lm_loss"], plain.detach())
    torch.testing.assert_close(parts["match_loss"], match_loss(pairs, (0,)))
    torch.testing.assert_close(loss, plain + 2.5 * match_loss(pairs, (0,)))
    # The match term trains the SFA path: its gradient is the total's minus the plain loss's, nonzero on
    # layer 0's q/k/v projection and exactly zero after layer 0's attention (its output projection, layer 1).
    params = dict(model.named_parameters())
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
             "transformer.h.1.attn.c_attn.weight", "transformer.ln_f.weight"]
    total = torch.autograd.grad(loss, [params[n] for n in names])
    lm_only = torch.autograd.grad(model(x, y)[1], [params[n] for n in names])
    from_match = {n: t - p for n, t, p in zip(names, total, lm_only)}
    c_attn = params["transformer.h.0.attn.c_attn.weight"]
    (expected,) = torch.autograd.grad(2.5 * match_loss(model(x, y, return_attention_pairs=True)[2], (0,)), c_attn)
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(from_match["transformer.h.0.attn.c_attn.weight"], expected, atol=1e-7, rtol=1e-4)
    for n in names[1:]:
        torch.testing.assert_close(from_match[n], torch.zeros_like(from_match[n]), atol=1e-7, rtol=0)


def test_match_loss_config_checks_name_the_key():
    assert parse_match_loss(None, 4, "dense") == MatchLoss(0.0, None)
    assert parse_match_loss({"match_weight": 1, "layers": [2, 0]}, 4, "sfa") == MatchLoss(1.0, (0, 2))
    with pytest.raises(ConfigError, match=r"convert.match_weight=1.0 .*needs attention=sfa.*'dense'"):
        parse_match_loss({"match_weight": 1.0, "layers": "all"}, 4, "dense")
    with pytest.raises(ConfigError, match=r"convert.match_weight .*>= 0, got -1"):
        parse_match_loss({"match_weight": -1, "layers": "all"}, 4, "sfa")
    with pytest.raises(ConfigError, match=r"convert.layers: 4 is not a layer index in \[0, n_layer=4\)"):
        parse_match_loss({"match_weight": 1, "layers": [0, 4]}, 4, "sfa")
    with pytest.raises(ConfigError, match=r"convert.layers must be 'all' or a non-empty list"):
        parse_match_loss({"match_weight": 1, "layers": "some"}, 4, "sfa")
    with pytest.raises(ConfigError, match=r"convert.layers lists a layer twice"):
        parse_match_loss({"match_weight": 1, "layers": [1, 1]}, 4, "sfa")


def test_the_config_check_refuses_a_match_weight_with_dense_attention():
    cfg = compose_run_config(["attention=dense", "convert=eq8"])
    with pytest.raises(ConfigError, match="convert.match_weight=1.0 .*needs attention=sfa"):
        check_config(cfg, 1)
    assert check_config(compose_run_config(["attention=sfa", "convert=eq8"]), 1).attention.kind == "sfa"


def test_init_checks_name_the_key(tmp_path):
    check_init({"from_hf": None, "from_checkpoint": None})
    with pytest.raises(ConfigError, match="init.from_hf=.* and init.from_checkpoint=.* are both set"):
        check_init({"from_hf": "gpt2", "from_checkpoint": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"init.from_checkpoint=.*nowhere.* does not exist"):
        check_init({"from_checkpoint": str(tmp_path / "nowhere")})


# --- initial weights --------------------------------------------------------------------------------
def test_init_from_an_hf_directory_gives_the_dense_logits_with_k_equal_to_the_head_dim(tmp_path):
    source = build_model("gpt2_tiny", "dense", **GPT2_DIMS)
    hf_model = to_hf(source)
    hf_model.save_pretrained(tmp_path / "hf")
    target = build_model("gpt2_tiny", sfa(32), **GPT2_DIMS)
    assert not torch.allclose(target.lm_head.weight, source.lm_head.weight)
    assert "init.from_hf=" in initialize_from(target, {"from_hf": str(tmp_path / "hf")})
    x, _ = tokens()
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x)[0], hf_model(x).logits.float(), atol=2e-4, rtol=1e-4)


def test_init_from_our_checkpoint_gives_the_dense_logits_with_k_equal_to_the_head_dim(tmp_path):
    source = build_model("gpt2_tiny", "dense", **GPT2_DIMS).eval()
    save_ours(source, "gpt2_tiny", GPT2_DIMS, tmp_path / "run" / "checkpoints" / "step_00000003.pt")
    target = build_model("gpt2_tiny", sfa(32), **GPT2_DIMS).eval()
    assert "step_00000003.pt" in initialize_from(target, {"from_checkpoint": str(tmp_path / "run")})  # a run dir
    x, _ = tokens()
    with torch.no_grad():
        torch.testing.assert_close(target(x)[0], source(x)[0], atol=2e-5, rtol=1e-5)
    k8 = build_model("gpt2_tiny", sfa(8), **GPT2_DIMS).eval()
    initialize_from(k8, {"from_checkpoint": str(tmp_path / "run")})
    with torch.no_grad():
        assert not torch.allclose(k8(x)[0], source(x)[0], atol=1e-3)  # real sparsity changes the function


def test_a_qwen3_feature_map_is_the_only_key_the_source_may_lack_and_starts_at_the_identity(tmp_path):
    source = build_model("qwen3_tiny", "dense", **QWEN3_DIMS).eval()
    save_ours(source, "qwen3_tiny", QWEN3_DIMS, tmp_path / "q.pt")
    target = build_model("qwen3_tiny", sfa(32, feature_map=True), **QWEN3_DIMS).eval()
    line = initialize_from(target, {"from_checkpoint": str(tmp_path / "q.pt")})
    assert "kept at the identity: 2 feature map(s)" in line
    x, _ = tokens()
    with torch.no_grad():
        torch.testing.assert_close(target(x)[0], source(x)[0], atol=2e-5, rtol=1e-5)


def test_weights_that_do_not_fit_are_refused_naming_the_keys():
    model = build_model("gpt2_tiny", "dense", **GPT2_DIMS)
    state = dict(model.state_dict())
    with pytest.raises(CheckpointError, match=r"unexpected \['extra.weight'\]"):
        load_weights(model, {**state, "extra.weight": torch.zeros(1)}, "src", EXTRA_TARGET_SUFFIXES)
    lacking = {k: v for k, v in state.items() if k != "transformer.h.0.attn.c_attn.weight"}
    with pytest.raises(CheckpointError, match=r"src: the weights do not fit this model: missing \['transformer.h.0.attn.c_attn.weight'"):
        load_weights(model, lacking, "src", EXTRA_TARGET_SUFFIXES)
    name = next(k for k in state if k.endswith("mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match=rf"src: shape mismatch:\n  {name}: source \(3, 3\)"):
        load_weights(model, {**state, name: torch.zeros(3, 3)}, "src", EXTRA_TARGET_SUFFIXES)


def test_initial_weights_that_do_not_fit_are_a_conversion_error(tmp_path):
    # Same model config, so the architecture check passes; the learned temperature adds parameters the
    # dense target lacks. train.py reports a ConversionError without a traceback.
    learned = build_model("gpt2_tiny", sfa(8, scale="learned"), **GPT2_DIMS)
    save_ours(learned, "gpt2_tiny", GPT2_DIMS, tmp_path / "learned.pt")
    with pytest.raises(ConversionError, match=r"init.from_checkpoint=.*learned.pt: the weights do not fit .*unexpected \['transformer"):
        initialize_from(build_model("gpt2_tiny", "dense", **GPT2_DIMS), {"from_checkpoint": str(tmp_path / "learned.pt")})


def test_a_source_of_another_architecture_is_refused_naming_the_fields(tmp_path):
    save_ours(build_model("gpt2_tiny", "dense", **GPT2_DIMS), "gpt2_tiny", GPT2_DIMS, tmp_path / "g.pt")
    deeper = build_model("gpt2_tiny", sfa(8), **{**GPT2_DIMS, "n_layer": 3})
    with pytest.raises(ConversionError, match=r"model.n_layer: source 2 vs this run 3"):
        initialize_from(deeper, {"from_checkpoint": str(tmp_path / "g.pt")})
    qwen = build_model("qwen3_tiny", sfa(8), **QWEN3_DIMS)
    with pytest.raises(ConversionError, match=r"the source is a GPT2Config but this run builds a Qwen3Config"):
        initialize_from(qwen, {"from_checkpoint": str(tmp_path / "g.pt")})


def test_a_missing_hf_directory_is_named(tmp_path):
    model = build_model("gpt2_tiny", sfa(8), **GPT2_DIMS)
    with pytest.raises(FileNotFoundError, match="from_hf: checkpoint directory .*nope does not exist"):
        initialize_from(model, {"from_hf": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        initialize_from(model, {"from_hf": str(tmp_path / "empty")})


# --- data.dir ---------------------------------------------------------------------------------------
def test_data_dir_must_be_a_prepared_directory_of_the_models_tokenizer(tmp_path):
    from data.format import DataFormatError
    from data.prepare import ensure_prepared
    from data.prepared_data import prepared_dir

    with pytest.raises(FileNotFoundError, match=r"data.dir=.*missing is not a directory"):
        prepared_dir(tmp_path / "missing", "gpt2")
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data.dir=.*raw has no meta.json"):
        prepared_dir(tmp_path / "raw", "gpt2")
    (tmp_path / "raw" / "meta.json").write_text("{")
    with pytest.raises(DataFormatError, match=r"data.dir=.*raw: .*not valid JSON"):
        prepared_dir(tmp_path / "raw", "gpt2")
    ready = ensure_prepared(source="embedded", tokenizer="gpt2", root=tmp_path / "data", max_tokens=20000)
    assert prepared_dir(ready, "gpt2") == ready
    with pytest.raises(DataFormatError, match=r"tokenized with 'gpt2' but this run's data.tokenizer is 'qwen3'"):
        prepared_dir(ready, "qwen3")


# --- through train.py -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_conversion_run_through_train_py_logs_both_losses_and_resumes_on_restart(tmp_path):
    from train_helpers import read_metrics, run_train

    small = ["train.batch_tokens=128", "train.micro_batch=4", "train.eval_every=0", "train.ckpt_every=2"]
    run_train(["run_name=dense", "attention=dense", "train.max_steps=2", *small],
              data_root=tmp_path / "data", root=tmp_path)
    data_dir = next((tmp_path / "data").iterdir())
    assert (data_dir / "meta.json").is_file()
    convert = ["run_name=conv", "attention=sfa", "attention.k=8", "convert=eq8", "convert.match_weight=0.5",
               f"init.from_checkpoint={tmp_path / 'runs' / 'dense'}", f"data.dir={data_dir}", *small]
    # data.root points nowhere usable: data.dir must be what the run reads.
    first = run_train([*convert, "train.max_steps=2"], data_root=tmp_path / "unused", root=tmp_path)
    assert "initial weights from init.from_checkpoint=" in first.stdout
    assert not (tmp_path / "unused").exists()
    records = read_metrics(tmp_path / "runs" / "conv")
    for r in records:
        assert r["match_loss"] > 0
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * r["match_loss"], rel=1e-5)

    # The restarted run continues from its own checkpoint, even though init is still configured.
    again = run_train([*convert, "train.max_steps=3"], data_root=tmp_path / "unused", root=tmp_path)
    assert "resumed from" in again.stdout and "initial weights from" not in again.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "conv")] == [1, 2, 3]
    config = yaml.safe_load((tmp_path / "runs" / "conv" / "config.yaml").read_text())
    assert config["convert"]["match_weight"] == 0.5 and config["data"]["dir"] == str(data_dir)


@pytest.mark.slow
def test_a_data_dir_without_meta_json_fails_the_run_with_the_key_named(tmp_path):
    from train_helpers import run_train

    (tmp_path / "tokens").mkdir()
    proc = run_train(["run_name=x", f"data.dir={tmp_path / 'tokens'}"], data_root=tmp_path / "d", root=tmp_path, check=False)
    assert proc.returncode != 0 and "has no meta.json" in proc.stdout and "data.dir=" in proc.stdout


def test_eval_finds_the_data_dir_a_run_trained_on(tmp_path):
    cfg = {"data": {"dir": str(tmp_path / "niah"), "root": "elsewhere", "source": "embedded", "tokenizer": "gpt2"}}
    assert run_data_dir(cfg) == tmp_path / "niah"
    assert run_data_dir({"data": {**cfg["data"], "dir": None}}).parent == __import__("pathlib").Path("elsewhere")


def test_the_hf_gpt2_experiment_builds_exactly_the_published_gpt2_architecture():
    """configs/experiment/convert_gpt2_124m_hf.yaml loads hub "gpt2": its config must match the model the
    experiment builds (checked offline against transformers' GPT2Config defaults, which are gpt2's)."""
    import transformers

    from models.hf import config_from_hf
    from models.presets import resolve_config
    from training.conversion import check_same_architecture

    cfg = compose_run_config(["experiment=convert_gpt2_124m_hf"])
    assert cfg["init"]["from_hf"] == "gpt2" and cfg["convert"]["match_weight"] > 0
    ours = model_config(cfg)
    check_same_architecture(config_from_hf(transformers.GPT2Config()), ours, "init.from_hf=gpt2")
    with pytest.raises(ConversionError, match="model.vocab_size: source 50257 vs this run 50304"):
        check_same_architecture(config_from_hf(transformers.GPT2Config()), resolve_config("gpt2_small"), "init.from_hf=gpt2")
