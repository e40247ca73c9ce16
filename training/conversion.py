"""Dense -> SFA conversion fine-tuning (paper Eq. 8): start from pretrained weights, train with
LM loss + λ·(1/H)·Σ_h ‖Õ_h − stopgrad(O_h)‖².

Two config groups feed it (docs/conversion.md; training/run_config.py checks them):
  init.from_hf / init.from_checkpoint : the weights a fresh run starts from (weights only: optimizer,
      scheduler and step start fresh). A run that already has its own checkpoint resumes from that
      instead, so a restarted conversion run never re-initialises.
  convert.match_weight (λ) / convert.layers : the output-matching term. Õ_h is head h's SFA output and
      O_h the dense output of the same layer input under the current weights, computed without gradient
      in the same forward (models' `return_attention_pairs=True`). ‖·‖² is a mean over batch, tokens and
      head dim; heads are averaged (the 1/H), and so are the selected layers, so λ does not scale with depth.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from training import checkpoint as ckpt
from training.run_config import MatchLoss, model_config

log = logging.getLogger(__name__)

# The only parameters an SFA target may have that a dense source lacks: Qwen3's optional d×d feature
# map, which the model initialises to the identity (so the converted model starts as the source + top-k).
EXTRA_TARGET_SUFFIXES = ("feature_map.weight",)
# Config fields that change nothing about the weights' meaning (GPT-2's dropout is a training choice).
IGNORED_ARCH_FIELDS = ("dropout",)


class ConversionError(ValueError):
    """Initial weights that do not fit the model being trained; the message names the keys."""


# --- the loss -------------------------------------------------------------------------------------
def match_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]], layers: tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean over `layers` of (1/H)·Σ_h mean_{b,t,d} (Õ − O)², with O treated as a constant.

    pairs: per layer (sfa_out, dense_out), each (B, H, T, Dv). Every head has the same number of
    elements, so the head average of per-head means is the mean over all of (B, H, T, Dv)."""
    chosen = range(len(pairs)) if layers is None else layers
    per_layer = []
    for i in chosen:
        sfa_out, dense_out = pairs[i]
        diff = sfa_out.float() - dense_out.detach().float()  # detach: the target never gets gradients
        per_layer.append(diff.pow(2).mean())
    return torch.stack(per_layer).mean()


def training_loss(model, x: torch.Tensor, y: torch.Tensor, match: MatchLoss):
    """(total loss, {"lm_loss", "match_loss"} detached) for one micro-batch; λ=0 is the plain LM loss,
    computed exactly as without conversion (no extra dense pass)."""
    if not match.enabled:
        _, loss = model(x, y)
        return loss, None
    _, lm, pairs = model(x, y, return_attention_pairs=True)
    matching = match_loss(pairs, match.layers)
    return lm + match.weight * matching, {"lm_loss": lm.detach().float(), "match_loss": matching.detach()}


# --- initial weights ------------------------------------------------------------------------------
def _source_weights(init: dict) -> tuple[dict, object, str]:
    """(state dict, model config, a name for messages) of the configured source."""
    if init.get("from_hf"):
        from models.hf import from_hf  # lazy: transformers is heavy and only init.from_hf needs it

        source = from_hf(str(init["from_hf"]), attention="dense")  # a local dir, or a hub name (HF_HUB_OFFLINE honoured)
        return source.state_dict(), source.config, f"init.from_hf={init['from_hf']}"
    state, cfg, file = ckpt.read_checkpoint(init["from_checkpoint"])
    where = f"init.from_checkpoint={file}"
    try:
        config = model_config(cfg)
    except ValueError as err:
        raise ConversionError(f"{where}: {err}") from err
    return state, config, where


def check_same_architecture(source_config, target_config, where: str) -> None:
    """Same model class and every shape/numerics field (eps, RoPE base, tying) equal; names the fields."""
    if type(source_config) is not type(target_config):
        raise ConversionError(
            f"{where}: the source is a {type(source_config).__name__} but this run builds a "
            f"{type(target_config).__name__}; choose the matching model=..."
        )
    src, dst = dataclasses.asdict(source_config), dataclasses.asdict(target_config)
    diffs = [f"model.{k}: source {src[k]!r} vs this run {dst[k]!r}"
             for k in src if k not in IGNORED_ARCH_FIELDS and src[k] != dst[k]]
    if diffs:
        raise ConversionError(
            f"{where}: the source model differs from this run's model; set the model.* overrides to match:\n  "
            + "\n  ".join(diffs)
        )


def initialize_from(model: torch.nn.Module, init: dict | None) -> str | None:
    """Load the configured initial weights into the freshly built (unwrapped) `model`. Returns a line
    describing what was loaded, or None if no init source is set."""
    init = init or {}
    if not (init.get("from_hf") or init.get("from_checkpoint")):
        return None
    try:
        state, source_config, where = _source_weights(init)
        check_same_architecture(source_config, model.config, where)
        kept = ckpt.load_weights(model, state, where, may_lack=EXTRA_TARGET_SUFFIXES)
    except ckpt.CheckpointError as err:  # a user error: train.py reports ConversionErrors without a traceback
        raise ConversionError(str(err)) from err
    extra = f"; kept at the identity: {len(kept)} feature map(s)" if kept else ""
    return f"initial weights from {where} ({len(state)} tensors) into {model.attention.kind} attention{extra}"
