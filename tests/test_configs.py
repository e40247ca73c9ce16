"""Every config in configs/ composes; bad values fail at start with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from models import build_model
from training.run_config import ConfigError, check_config
from training.distributed import resolve_mode, setup
from training.hydra_setup import CONFIG_DIR, register_resolvers

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def compose_train(overrides=(), tmp_root="/tmp/sfa-test-root"):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"root={tmp_root}", *overrides])


def resolved(overrides=()):
    return OmegaConf.to_container(compose_train(overrides), resolve=True)


def all_options():
    for group in GROUPS:
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_config_composes_and_resolves(group, option):
    extra = ["data.source=/some/texts"] if (group, option) == ("data", "local") else []
    cfg = resolved([f"{group}={option}", *extra])
    # each group's file names what it selects, so a misnamed or miswired file shows up here
    selected = {"model": "preset", "attention": "kind", "logging": "mode", "dist": "mode", "optim": "name"}
    if group in selected:
        assert cfg[group][selected[group]] == option
    if group == "data":
        assert cfg["data"]["tokenizer"] == cfg["model"]["tokenizer"]
    assert cfg["out_dir"].startswith("/tmp/sfa-test-root/runs/")


def unresolved(overrides=()):
    return OmegaConf.to_container(compose_train(overrides), resolve=False)


def experiment_parts(name):
    """(group choices from the file's defaults list, the file's own keys) of configs/experiment/<name>.yaml."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "experiment" / f"{name}.yaml"))
    choices = []
    for entry in raw.pop("defaults", []):
        ((key, option),) = entry.items()
        choices.append(f"{key.removeprefix('override ').strip('/')}={option}")
    return choices, raw


def overlay(base, keys):
    for key, value in keys.items():
        base[key] = overlay(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_an_experiment_is_its_group_choices_plus_its_own_keys(experiment):
    # `experiment=X` must equal choosing X's groups on the command line and then setting X's keys on top:
    # a missing `@package _global_`, an experiment placed before `_self_` in train.yaml's defaults (so
    # train.yaml's values win), or a misspelt group option all break this equality.
    choices, own = experiment_parts(experiment)
    assert own, "an experiment sets some keys"
    assert unresolved([f"experiment={experiment}"]) == overlay(unresolved(choices), own)
    check_config(resolved([f"experiment={experiment}"]), world_size=1)  # and the result is a runnable config


@pytest.mark.parametrize("experiment, tokens_per_step", [("gpt2_124m_owt", 2**19), ("qwen3_0.6b_pile", 2**19)])
def test_paper_scale_experiments_keep_their_token_batch_on_one_to_eight_processes(experiment, tokens_per_step):
    # The paper's ~0.5M-token steps (nanoGPT's 2^19) whatever the world size: processes replace accumulation.
    cfg = resolved([f"experiment={experiment}"])
    plans = {n: check_config(cfg, world_size=n) for n in (1, 2, 4, 8)}
    for n, plan in plans.items():
        assert plan.grad_accum * plan.tokens_per_micro_batch == tokens_per_step
        assert plan.tokens_per_micro_batch == n * plan.micro_batch * cfg["train"]["seq_len"]
        assert plan.grad_accum * n == plans[1].grad_accum


def test_groups_the_issue_asks_for_exist():
    names = {group: {stem for g, stem in all_options() if g == group} for group in GROUPS}
    assert {"gpt2_tiny", "gpt2_small", "gpt2_medium", "qwen3_tiny", "qwen3_0.6b"} <= names["model"]
    assert {"dense", "sfa", "short"} <= names["attention"]
    assert {"embedded", "openwebtext", "local"} <= names["data"]
    assert {"online", "offline", "disabled"} <= names["logging"]
    assert {"none", "ddp", "fsdp2"} <= names["dist"]
    assert "adamw" in names["optim"]


@pytest.mark.parametrize("preset", ["gpt2_tiny", "gpt2_small", "gpt2_medium", "qwen3_tiny", "qwen3_0.6b"])
@pytest.mark.parametrize("attention", ["dense", "sfa", "short"])
def test_every_model_attention_pair_builds_the_model_the_config_names(preset, attention):
    # What train.py does with the plan, on the meta device: the attention group's defaults (sfa k=8,
    # short d_short=32, configs/attention/) must reach every layer's attention and the cost accounting.
    plan = check_config(resolved([f"model={preset}", f"attention={attention}"]), world_size=1)
    with torch.device("meta"):
        model = build_model(plan.model_config, plan.attention)
    assert type(model.config).__name__ == ("GPT2Config" if preset.startswith("gpt2") else "Qwen3Config")
    dims = model.attention_flops_dims()
    topk = 8 if attention == "sfa" else None
    assert (dims["topk_q"], dims["topk_k"]) == (topk, topk)
    assert dims["head_dim"] == (32 if attention == "short" else model.config.head_dim)
    assert dims["n_layer"] == model.config.n_layer


def test_default_is_tiny_gpt2_with_sfa_k8_of_64():
    cfg = resolved()
    plan = check_config(cfg, world_size=1)
    assert cfg["model"]["preset"] == "gpt2_tiny" and cfg["data"]["source"] == "embedded"
    assert (plan.attention.kind, plan.attention.topk_q, plan.attention.topk_k) == ("sfa", 8, 8)
    assert plan.model_config.head_dim == 64
    assert cfg["root"] == "/tmp/sfa-test-root"


def test_default_root_is_workspace_at_repo_root(monkeypatch):
    monkeypatch.delenv("SFA_WORKSPACE", raising=False)
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train")
    assert Path(cfg.root) == CONFIG_DIR.parent / "workspace"
    assert Path(cfg.out_dir).parent == CONFIG_DIR.parent / "workspace" / "runs"
    assert Path(cfg.out_dir).name == cfg.run_name and cfg.run_name.startswith("gpt2_tiny-sfa-q8k8-")


def test_attention_k_sets_both_and_each_can_be_overridden():
    plan = check_config(resolved(["attention.k=4"]), world_size=1)
    assert (plan.attention.topk_q, plan.attention.topk_k) == (4, 4)
    plan = check_config(resolved(["attention.k=4", "attention.topk_k=16"]), world_size=1)
    assert (plan.attention.topk_q, plan.attention.topk_k) == (4, 16)


def test_dense_ignores_k_so_mixed_sweeps_compose():
    plan = check_config(resolved(["attention=dense", "attention.k=4"]), world_size=1)
    assert plan.attention.kind == "dense" and plan.attention.topk_q is None


def test_grad_accumulation_is_derived_from_tokens():
    plan = check_config(resolved(["train.batch_tokens=8192", "train.micro_batch=4", "train.seq_len=128"]), world_size=2)
    assert plan.grad_accum == 8192 // (4 * 128 * 2)


def test_model_overrides_reach_the_model_config():
    plan = check_config(resolved(["model.n_layer=2", "model.head_dim=32"]), world_size=1)
    assert (plan.model_config.n_layer, plan.model_config.head_dim) == (2, 32)


def test_unknown_key_is_caught_by_struct_mode():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_train(["train.max_stepz=3"])


def test_unknown_attention_group_option():
    with pytest.raises(ConfigCompositionException, match="attention/sparse"):
        compose_train(["attention=sparse"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["attention.k=65"], r"attention.k=65 must be an int in \[1, head_dim=64\]"),
        (["attention.topk_k=0"], r"attention.topk_k=0 must be an int in \[1, head_dim=64\]"),
        (["attention.kind=sparse"], r"attention.kind='sparse' is unknown"),
        (["attention.backend=fastest"], r"attention.backend='fastest' is unknown; available: auto, reference"),
        (["attention=dense", "attention.backend=nope"], r"attention.backend='nope' is unknown"),
        (["attention=short", "attention.d_short=128"], r"attention.d_short=128 must be an int in \[1, head_dim=64\]"),
        (["train.batch_tokens=5000", "train.micro_batch=16"], r"train.batch_tokens=5000 is not divisible by train.micro_batch \* train.seq_len \* world_size = 16 \* 128 \* 1 = 2048"),
        (["train.seq_len=2048"], r"train.seq_len=2048 exceeds the model's positions .*max_seq_len=1024"),
        (["train.max_steps=0"], r"train.max_steps must be a positive integer, got 0"),
        (["train.micro_batch=0"], r"train.micro_batch must be a positive integer"),
        (["train.dtype=fp16"], r"train.dtype must be one of auto, fp32, bf16; got 'fp16'"),
        (["train.resume=/no/such/ckpt.pt"], r"train.resume must be auto, none, a checkpoint file or a run directory"),
        (["optim.min_lr=1.0"], r"optim.min_lr <= optim.lr"),
        (["logging.mode=loud"], r"logging.mode must be one of online, offline, disabled; got 'loud'"),
        (["model.n_layer=0"], r"model: GPT2Config.n_layer must be a positive int, got 0"),
        (["metrics.peak_flops=-1"], r"metrics.peak_flops must be a positive number"),
    ],
)
def test_impossible_values_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(resolved(overrides), world_size=1)


def test_batch_tokens_checked_against_world_size():
    cfg = resolved(["train.batch_tokens=2048", "train.micro_batch=16", "train.seq_len=128"])
    check_config(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"= 16 \* 128 \* 2 = 4096"):
        check_config(cfg, world_size=2)


def test_fsdp2_on_one_cpu_process_is_refused(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = compose_train(["dist=fsdp2"])
    with pytest.raises(ValueError, match=r"dist=fsdp2 on a single CPU process"):
        setup(cfg.dist, "cpu")


def test_dist_modes():
    assert resolve_mode("auto", 1) == "none" and resolve_mode("auto", 4) == "ddp"
    with pytest.raises(ValueError, match=r"dist=none but torchrun started 2 processes"):
        resolve_mode("none", 2)
    with pytest.raises(ValueError, match=r"dist.mode must be one of auto, none, ddp, fsdp2; got 'zero3'"):
        resolve_mode("zero3", 1)


def test_cuda_requested_without_gpu(monkeypatch):
    import torch

    from training.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"train.device=cuda but no CUDA device"):
        resolve_device("cuda", 0)
    with pytest.raises(ValueError, match=r"train.device must be one of auto, cpu, cuda; got 'tpu'"):
        resolve_device("tpu", 0)


def test_evaluation_resolves_devices_by_the_same_rule_naming_its_own_key(monkeypatch):
    import torch

    from training.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", key="--device") == torch.device("cpu")
    assert resolve_device(torch.device("cpu"), key="--device") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device=cuda:1 but no CUDA device is available \(use --device=auto or cpu\)"):
        resolve_device("cuda:1", key="--device")
    with pytest.raises(ValueError, match=r"--device must be one of auto, cpu, cuda; got 'cuda:x'"):
        resolve_device("cuda:x", key="--device")


def test_run_names_tell_the_feature_map_apart():
    # Two runs that differ only in the Qwen3 feature map must not share (and resume) one run directory.
    plain = resolved(["model=qwen3_tiny", "attention.k=16"])
    mapped = resolved(["model=qwen3_tiny", "attention.k=16", "attention.feature_map=true"])
    assert plain["run_name"].startswith("qwen3_tiny-sfa-q16k16-")
    assert mapped["run_name"].startswith("qwen3_tiny-sfa-q16k16-fmap-")
    assert plain["out_dir"] != mapped["out_dir"]
