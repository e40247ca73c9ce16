"""Load any of our training checkpoints as a ready-to-evaluate model.

A checkpoint (training/checkpoint.py) holds the model state dict under "model" and the resolved run
config under "config"; the model is rebuilt from that config with the same helpers train.py uses, so
an evaluation never needs the run's command line. `attention` replaces the trained attention, e.g. to
evaluate a dense checkpoint with SFA switched on without training (the conversion study).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .runtime import resolve_device

# Wrappers whose prefixes may appear in a saved state dict (torch.compile, DDP).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def find_checkpoint(path: str | Path) -> Path:
    """A .pt file as given, or the newest checkpoint of a run directory."""
    from training.checkpoint import latest_checkpoint

    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"checkpoint: run directory {path} has no checkpoints/step_*.pt")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist (give a step_*.pt file or a run directory)")
    return path


def read_checkpoint(path: str | Path) -> tuple[dict, dict, Path]:
    """(model state dict, run config, resolved file path), with clear errors for anything else."""
    path = find_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # data only, never code
    except Exception as err:  # torch raises several types for truncated/foreign files
        raise ValueError(f"checkpoint: cannot read {path} as a torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict) or not isinstance(payload.get("config"), dict):
        raise ValueError(f"checkpoint: {path} is not a checkpoint of this project (needs 'model' and 'config' entries)")
    return payload["model"], payload["config"], path


def attention_from_config(cfg: dict) -> dict:
    from training.config_checks import attention_fields

    if not isinstance(cfg.get("attention"), dict):
        raise ValueError("checkpoint: its config has no 'attention' section")
    return attention_fields(cfg["attention"])


def build_from_config(cfg: dict, attention=None) -> torch.nn.Module:
    """The model a run config describes (weights freshly initialised), with `attention` overriding its
    attention section when given (an AttentionConfig, a dict of its fields, or a kind name)."""
    from models import build_model
    from training.config_checks import model_overrides

    model_cfg = cfg.get("model")
    if not isinstance(model_cfg, dict) or "preset" not in model_cfg:
        raise ValueError("checkpoint: its config has no 'model' section with a 'preset'")
    chosen = attention_from_config(cfg) if attention is None else attention
    return build_model(model_cfg["preset"], chosen, **model_overrides(model_cfg))


def strip_wrapper_prefixes(state: dict) -> dict:
    out = {}
    for name, tensor in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor
    return out


def attention_override(kind: str | None, k: int | None = None, backend: str = "auto") -> dict | None:
    """The `--attention KIND --k K` command-line pair as an attention override (None = as trained)."""
    if kind is None:
        if k is not None:
            raise ValueError("--k needs --attention sfa (k is the number of features SFA keeps)")
        return None
    if kind == "sfa":
        if k is None:
            raise ValueError("--attention sfa needs --k (features kept per query/key row, e.g. 8)")
        return {"kind": "sfa", "topk_q": int(k), "backend": backend}
    if kind == "dense":
        if k is not None:
            raise ValueError("--k is only meaningful with --attention sfa")
        return {"kind": "dense"}
    raise ValueError(
        f"--attention must be 'sfa' or 'dense' (an override that keeps the checkpoint's parameters), got {kind!r}"
    )


def load_model(path: str | Path, device="cpu", attention=None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, the run config it was trained with).

    `path` is a checkpoint file or a run directory (its newest checkpoint). `attention` (optional)
    replaces the trained attention; it must not change parameter shapes (dense <-> sfa is fine, the
    short baseline or a Qwen3 feature map is not)."""
    state, cfg, file = read_checkpoint(path)
    model = build_from_config(cfg, attention)
    state = strip_wrapper_prefixes(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(n for n in set(state) & set(expected) if state[n].shape != expected[n].shape)
    if missing or unexpected or mismatched:
        why = " (the attention override changes the model's parameters)" if attention is not None else ""
        raise ValueError(
            f"checkpoint: {file} does not fit the model its config describes{why}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape-mismatched {mismatched[:5]}"
        )
    model.load_state_dict(state)
    return model.to(resolve_device(device)).eval(), cfg


def save_model(model: torch.nn.Module, cfg: dict, path: str | Path) -> Path:
    """`load_model`'s counterpart: write the fields it reads ("model", "config") atomically, in the
    layout train.py uses, e.g. for a model converted from HF weights or built in a test. Optimizer,
    loader and RNG states are absent, so train.py cannot resume from such a file."""
    from training.checkpoint import FORMAT_VERSION, save_atomic

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return save_atomic({"format_version": FORMAT_VERSION, "config": cfg, "model": state}, path)


def compose_run_config(overrides: list[str] = ()) -> dict:
    """The resolved config train.py would run with these Hydra overrides (e.g. ["model=gpt2_tiny",
    "attention=dense"]), as a plain dict: what a checkpoint stores under "config"."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from training.hydra_setup import CONFIG_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def run_data_dir(cfg: dict) -> Path | None:
    """The prepared data directory a run trained on (as train.py derives it), or None if unknown."""
    from data.prepare import data_dir_name

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
