"""Checks that make typos and impossible combinations fail before anything is built, with a message that
names the config key. (Unknown keys are Hydra's struct mode's job; this is about values.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sfa

MODEL_META_KEYS = ("preset", "tokenizer")
WANDB_MODES = ("online", "offline", "disabled")
DTYPES = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass(frozen=True)
class Plan:
    """What the checks derive: the model's config, the resolved attention, the batch arithmetic and the
    conversion loss."""

    model_config: object
    attention: object
    micro_batch: int
    grad_accum: int
    tokens_per_micro_batch: int  # all processes together
    match_loss: object  # training.conversion.MatchLoss: the Eq. 8 output-matching term (weight 0 = off)
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
        scale=att_cfg.get("scale", "sqrt_d"),
    )


def _known_backends() -> list[str]:
    try:  # the Triton backends register themselves on import, where Triton is usable
        import sfa.kernels  # noqa: F401
    except ImportError:
        pass
    return sfa.available_backends()


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
    from models import AttentionConfig
    from models.presets import model_class, resolve_config

    train, optim, att = cfg["train"], cfg["optim"], cfg["attention"]

    try:
        model_config = resolve_config(cfg["model"]["preset"], **model_overrides(cfg["model"]))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from e

    if att["backend"] not in _known_backends():
        raise ConfigError(
            f"attention.backend={att['backend']!r} is unknown; available: {', '.join(_known_backends())}"
        )
    try:
        attention = AttentionConfig(**attention_fields(att)).resolved(
            model_config.head_dim, uses_rope=model_class(model_config).uses_rope
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(_as_typed(str(e), att)) from e

    seq_len = _positive_int(train["seq_len"], "train.seq_len")
    if seq_len > model_config.max_seq_len:
        raise ConfigError(
            f"train.seq_len={seq_len} exceeds the model's positions (model {cfg['model']['preset']} has "
            f"max_seq_len={model_config.max_seq_len}); lower train.seq_len or set model.max_seq_len"
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

    from training.conversion import check_init, parse_match_loss

    check_init(cfg.get("init"))

    return Plan(
        model_config=model_config,
        attention=attention,
        micro_batch=micro_batch,
        grad_accum=batch_tokens // per_micro_step,
        tokens_per_micro_batch=per_micro_step,
        match_loss=parse_match_loss(cfg.get("convert"), model_config.n_layer, attention.kind),
        warmup_steps=warmup,
        decay_steps=decay_steps,
        warnings=tuple(warnings),
    )


def _check_compile_backend(backend) -> None:
    import torch._dynamo  # heavy: only when train.compile is on

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

