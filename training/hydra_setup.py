"""Hydra for the run config: the OmegaConf resolvers configs/ uses (call `register_resolvers()` before
composing) and `compose_run_config`, the config train.py would run with, outside a Hydra run. The one
module of training/ that imports Hydra."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from training.run_names import default_run_name

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
# The sections the default run name reads (training/run_names.py); resolving only these keeps the
# resolver away from run_name/out_dir themselves.
RUN_NAME_SECTIONS = ("model", "attention", "data", "convert", "optim", "train", "init")


def _run_name(*, _root_) -> str:
    sections = {key: OmegaConf.to_container(_root_[key], resolve=True) for key in RUN_NAME_SECTIONS if key in _root_}
    return default_run_name(sections)


def register_resolvers() -> None:
    # The workspace root defaults to <repo>/workspace wherever train.py is launched from.
    if not OmegaConf.has_resolver("sfa_repo_root"):
        OmegaConf.register_new_resolver("sfa_repo_root", lambda: str(REPO_ROOT))
    # Run names must tell apart runs that differ only in a boolean switch (e.g. the Qwen3 feature map).
    if not OmegaConf.has_resolver("sfa_flag"):
        OmegaConf.register_new_resolver("sfa_flag", lambda on, text: text if on else "")
    # ... and in the attention variants (configs/attention/*.yaml `tag`): "" for the paper's layout.
    if not OmegaConf.has_resolver("sfa_variant"):
        OmegaConf.register_new_resolver("sfa_variant", attention_variant_tag)
    # run_name: ${sfa_run_name:} names the run after its config (readable part + hash).
    if not OmegaConf.has_resolver("sfa_run_name"):
        OmegaConf.register_new_resolver("sfa_run_name", _run_name)


def attention_variant_tag(rope: str, rope_dims, scale: str, rope_shared=False) -> str:
    """Run-name suffix for the rope and scale axes: e.g. "-rope32" (decoupled), "-rope32s" (its rotary key
    shared by the KV heads), "-nope", "-sqrtk"."""
    parts = {"full": "", "none": "-nope", "decoupled": f"-rope{rope_dims}"}.get(rope, f"-rope_{rope}")
    parts += "s" if rope_shared else ""
    return parts + {"sqrt_d": "", "sqrt_k": "-sqrtk", "learned": "-tlearn"}.get(scale, f"-{scale}")


def compose_run_config(overrides: list[str] = ()) -> dict:
    """The resolved config train.py would run with these Hydra overrides (e.g. ["model=gpt2_tiny",
    "attention=dense"]), as a plain dict: what a checkpoint stores under "config"."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)
