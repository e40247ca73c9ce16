"""The run config: a resolved train.yaml as a plain dict (what a checkpoint stores under "config").

This module is the one owner of what its sections mean: the error type every config problem raises
(ConfigError, naming the key), the model overrides and attention fields, the conversion loss, and what the
config names (its model, data directory and tokenizer). `check_config` makes typos and impossible
combinations fail before anything is built. (Unknown keys are Hydra's struct mode's job; this is about values.)
Composing a config from Hydra overrides is training/hydra_setup.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

import sfa
from data.prepare import data_dir_name
from models import AttentionConfig, build_model
from models.presets import model_class, resolve_config

MODEL_META_KEYS = ("preset", "tokenizer")
WANDB_MODES = ("online", "offline", "disabled")
DTYPES = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass(frozen=True)
class MatchLoss:
    """The conversion's output-matching term (training/conversion.py): weight λ (0 = off) and the layers it
    averages over (None = all)."""

    weight: float = 0.0
    layers: tuple[int, ...] | None = None

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclass(frozen=True)
class Plan:
    """What the checks derive: the model's config, the resolved attention, the batch arithmetic and the
    conversion loss."""

    model_config: object
    attention: object
    micro_batch: int
    grad_accum: int
    tokens_per_micro_batch: int  # all processes together
    match_loss: MatchLoss  # the Eq. 8 output-matching term (weight 0 = off)
    warmup_steps: int  # optim.warmup_steps, clamped to the decay horizon
    decay_steps: int  # optim.decay_steps, or train.max_steps when that is null
    warnings: tuple[str, ...] = ()  # what the checks adjusted, for the log


def model_overrides(model_cfg: dict) -> dict:
    """The model fields the config sets (null = keep the preset's value)."""
    return {k: v for k, v in model_cfg.items() if k not in MODEL_META_KEYS and v is not None}


def attention_fields(att_cfg: dict) -> dict:
    """AttentionConfig fields from the attention group: topk only for sfa, d_short only for short, so that
    a sweep such as `attention=dense,sfa attention.k=4,8` composes for the dense job too."""
    kind = att_cfg["kind"]
    return dict(
        kind=kind,
        topk_q=att_cfg["topk_q"] if kind == "sfa" else None,
        topk_k=att_cfg["topk_k"] if kind == "sfa" else None,
        d_short=att_cfg["d_short"] if kind == "short" else None,
        backend=att_cfg["backend"],
        feature_map=att_cfg["feature_map"],
        # Configs saved before the rope/scale axes existed mean the paper's layout.
        rope=att_cfg.get("rope", "full"),
        rope_dims=att_cfg.get("rope_dims"),
        rope_shared=att_cfg.get("rope_shared", False),
        scale=att_cfg.get("scale", "sqrt_d"),
    )


# --- what a config names: its model, data directory and tokenizer ----------------------------------------
def model_config(cfg: dict):
    """The model's dataclass config (GPT2Config or Qwen3Config): the preset with the config's overrides."""
    model_cfg = cfg.get("model")
    if not isinstance(model_cfg, dict) or "preset" not in model_cfg:
        raise ConfigError("model: the config has no 'model' section with a 'preset'")
    try:
        return resolve_config(model_cfg["preset"], **model_overrides(model_cfg))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from e


def model_from_config(cfg: dict, attention=None) -> nn.Module:
    """The model a run config describes (weights freshly initialised), with `attention` overriding its
    attention section when given (an AttentionConfig, a dict of its fields, or a kind name)."""
    if attention is None:
        if not isinstance(cfg.get("attention"), dict):
            raise ConfigError("attention: the config has no 'attention' section")
        attention = attention_fields(cfg["attention"])
    return build_model(model_config(cfg), attention)


def run_data_dir(cfg: dict) -> Path | None:
    """The prepared data directory a run trained on (as train.py derives it), or None if unknown."""
    data = cfg.get("data")
    if isinstance(data, dict) and data.get("dir"):  # train.py's data.dir: an already-prepared directory
        return Path(data["dir"])
    if not isinstance(data, dict) or not all(k in data for k in ("root", "source", "tokenizer")):
        return None
    return Path(data["root"]) / data_dir_name(data["source"], data["tokenizer"])


def run_tokenizer(cfg: dict) -> str | None:
    """The tokenizer name a run trained with (data.tokenizer, else model.tokenizer)."""
    for section in ("data", "model"):
        name = (cfg.get(section) or {}).get("tokenizer") if isinstance(cfg.get(section), dict) else None
        if name:
            return name
    return None


# --- the checks ------------------------------------------------------------------------------------------
def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")
    return value


def check_config(cfg: dict, world_size: int) -> Plan:
    """Validate a resolved config (a plain dict) for `world_size` processes; return the derived plan."""
    train, optim, att = cfg["train"], cfg["optim"], cfg["attention"]
    model = model_config(cfg)

    if att["backend"] not in sfa.available_backends():
        raise ConfigError(
            f"attention.backend={att['backend']!r} is unknown; available: {', '.join(sfa.available_backends())}"
        )
    try:
        attention = AttentionConfig(**attention_fields(att)).resolved(
            model.head_dim, uses_rope=model_class(model).uses_rope
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(_as_typed(str(e), att)) from e

    seq_len = _positive_int(train["seq_len"], "train.seq_len")
    if seq_len > model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={seq_len} exceeds the model's positions (model {cfg['model']['preset']} has "
            f"max_seq_len={model.max_seq_len}); lower train.seq_len or set model.max_seq_len"
        )
    batch_tokens = _positive_int(train["batch_tokens"], "train.batch_tokens")
    micro_batch = _positive_int(train["micro_batch"], "train.micro_batch")
    per_micro_step = micro_batch * seq_len * world_size
    if batch_tokens % per_micro_step != 0:
        raise ConfigError(
            f"train.batch_tokens={batch_tokens} is not divisible by train.micro_batch * train.seq_len * world_size "
            f"= {micro_batch} * {seq_len} * {world_size} = {per_micro_step}; pick batch_tokens as a multiple of "
            f"{per_micro_step} (gradient accumulation steps = batch_tokens / that product)"
        )

    max_steps = _positive_int(train["max_steps"], "train.max_steps")
    for key in ("eval_every", "log_every", "ckpt_every", "keep_checkpoints"):
        _non_negative_int(train[key], f"train.{key}")
    _positive_int(train["eval_batches"], "train.eval_batches")
    if train["dtype"] not in DTYPES:
        raise ConfigError(f"train.dtype must be one of {', '.join(DTYPES)}; got {train['dtype']!r}")
    if train.get("compile"):
        _check_compile_backend(train.get("compile_backend", "inductor"))
    limit = train["time_limit_s"]
    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
        raise ConfigError(f"train.time_limit_s must be a positive number of seconds or null, got {limit!r}")
    nonfinite = train.get("nonfinite", "skip")
    if nonfinite not in ("skip", "stop"):
        raise ConfigError(f"train.nonfinite must be skip or stop; got {nonfinite!r}")
    _positive_int(train.get("nonfinite_max_consecutive", 5), "train.nonfinite_max_consecutive")
    min_free = train.get("min_free_gb", 0)
    if isinstance(min_free, bool) or not (isinstance(min_free, (int, float)) and min_free >= 0):
        raise ConfigError(f"train.min_free_gb must be a number of GB >= 0, got {min_free!r}")
    resume = train["resume"]
    if resume not in ("auto", "none") and not Path(str(resume)).exists():
        raise ConfigError(f"train.resume must be auto, none, a checkpoint file or a run directory; {resume!r} does not exist")

    if not optim["lr"] > 0 or not 0 <= optim["min_lr"] <= optim["lr"]:
        raise ConfigError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr; got lr={optim['lr']}, min_lr={optim['min_lr']}")
    decay_steps = optim["decay_steps"] if optim["decay_steps"] is not None else max_steps
    _positive_int(decay_steps, "optim.decay_steps")
    warmup = _non_negative_int(optim["warmup_steps"], "optim.warmup_steps")
    warnings = []
    if warmup > decay_steps:  # e.g. a 5-step smoke test under the default 10 warm-up steps
        horizon = "optim.decay_steps" if optim["decay_steps"] is not None else "train.max_steps"
        warnings.append(f"optim.warmup_steps={warmup} is longer than the schedule ({horizon}={decay_steps}); "
                        f"warming up over {decay_steps} steps instead")
        warmup = decay_steps
    if optim["grad_clip"] < 0:
        raise ConfigError(f"optim.grad_clip must be >= 0 (0 = off), got {optim['grad_clip']}")

    if cfg["logging"]["mode"] not in WANDB_MODES:
        raise ConfigError(f"logging.mode must be one of {', '.join(WANDB_MODES)}; got {cfg['logging']['mode']!r}")
    peak = cfg["metrics"]["peak_flops"]
    if peak is not None and not (isinstance(peak, (int, float)) and peak > 0):
        raise ConfigError(f"metrics.peak_flops must be a positive number (FLOP/s per device) or null, got {peak!r}")

    check_init(cfg.get("init"))

    return Plan(
        model_config=model,
        attention=attention,
        micro_batch=micro_batch,
        grad_accum=batch_tokens // per_micro_step,
        tokens_per_micro_batch=per_micro_step,
        match_loss=parse_match_loss(cfg.get("convert"), model.n_layer, attention.kind),
        warmup_steps=warmup,
        decay_steps=decay_steps,
        warnings=tuple(warnings),
    )


def _check_compile_backend(backend) -> None:
    import torch._dynamo  # lazy: heavy, only when train.compile is on

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"train.compile_backend={backend!r} is not a torch.compile backend; use one of "
                          f"{', '.join(torch._dynamo.list_backends())} (inductor generates kernels), or a debug "
                          "backend such as aot_eager (traces only; CPU tests)")


def _as_typed(message: str, att_cfg: dict) -> str:
    """Name `attention.k`, the key people type, in an error about the topk_q/topk_k it sets (the attention
    group derives both from k), unless topk_q/topk_k were set to another value on their own."""
    k = att_cfg.get("k")
    for name in ("topk_q", "topk_k"):
        if k is not None and att_cfg.get(name) == k and f"attention.{name}=" in message:
            return message.replace(f"attention.{name}=", "attention.k=", 1)
    return message


def parse_match_loss(convert: dict | None, n_layer: int, attention_kind: str) -> MatchLoss:
    """Validate the `convert` section (absent = off); errors name the key."""
    convert = convert or {}
    weight = convert.get("match_weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ConfigError(f"convert.match_weight (λ of the output-matching loss) must be a number >= 0, got {weight!r}")
    if weight > 0 and attention_kind != "sfa":
        raise ConfigError(
            f"convert.match_weight={weight} matches SFA outputs to dense ones, so it needs attention=sfa "
            f"(this run has attention.kind={attention_kind!r}); set convert.match_weight=0 or attention=sfa"
        )
    layers = convert.get("layers", "all")
    if layers == "all":
        return MatchLoss(float(weight), None)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ConfigError(f"convert.layers must be 'all' or a non-empty list of layer indices, got {layers!r}")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layer:
            raise ConfigError(f"convert.layers: {i!r} is not a layer index in [0, n_layer={n_layer})")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"convert.layers lists a layer twice: {list(layers)}")
    return MatchLoss(float(weight), tuple(sorted(layers)))


def check_init(init: dict | None) -> None:
    """At most one source; a from_checkpoint path must exist (from_hf may be a hub name, checked on load)."""
    init = init or {}
    hf, ours = init.get("from_hf"), init.get("from_checkpoint")
    if hf and ours:
        raise ConfigError(f"init.from_hf={hf!r} and init.from_checkpoint={ours!r} are both set; choose one source")
    if ours and not Path(str(ours)).exists():
        raise ConfigError(f"init.from_checkpoint={ours!r} does not exist (give a step_*.pt file or a run directory)")
