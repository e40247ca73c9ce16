"""Dense -> SFA conversion fine-tuning (paper Eq. 8): start from pretrained weights, train with
LM loss + λ·(1/H)·Σ_h ‖Õ_h − stopgrad(O_h)‖².

Two config groups feed it (docs/conversion.md):
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
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The only parameters an SFA target may have that a dense source lacks: Qwen3's optional d×d feature
# map, which the model initialises to the identity (so the converted model starts as the source + top-k).
EXTRA_TARGET_SUFFIXES = ("feature_map.weight",)
# Config fields that change nothing about the weights' meaning (GPT-2's dropout is a training choice).
IGNORED_ARCH_FIELDS = ("dropout",)


class ConversionError(ValueError):
    """Initial weights that do not fit the model being trained; the message names the keys."""


# --- config ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatchLoss:
    """The output-matching term: weight λ (0 = off) and the layers it averages over (None = all)."""

    weight: float = 0.0
    layers: tuple[int, ...] | None = None

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def parse_match_loss(convert: dict | None, n_layer: int, attention_kind: str) -> MatchLoss:
    """Validate the `convert` section (absent = off); errors name the key."""
    from training.config_checks import ConfigError

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
    from training.config_checks import ConfigError

    init = init or {}
    hf, ours = init.get("from_hf"), init.get("from_checkpoint")
    if hf and ours:
        raise ConfigError(f"init.from_hf={hf!r} and init.from_checkpoint={ours!r} are both set; choose one source")
    if ours and not Path(str(ours)).exists():
        raise ConfigError(f"init.from_checkpoint={ours!r} does not exist (give a step_*.pt file or a run directory)")


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
        from models import from_hf

        source = from_hf(str(init["from_hf"]), attention="dense")  # a local dir, or a hub name (HF_HUB_OFFLINE honoured)
        return source.state_dict(), source.config, f"init.from_hf={init['from_hf']}"
    from evaluation.checkpoint import read_checkpoint, strip_wrapper_prefixes
    from models.presets import resolve_config
    from training.config_checks import model_overrides

    state, cfg, file = read_checkpoint(init["from_checkpoint"])
    model_cfg = cfg.get("model")
    if not isinstance(model_cfg, dict) or "preset" not in model_cfg:
        raise ConversionError(f"init.from_checkpoint: {file} has no 'model' section with a 'preset' in its config")
    config = resolve_config(model_cfg["preset"], **model_overrides(model_cfg))
    return strip_wrapper_prefixes(state), config, f"init.from_checkpoint={file}"


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


def load_weights(model: torch.nn.Module, state: dict, where: str) -> list[str]:
    """Copy `state` into `model` (strict, except the identity-initialised SFA extras the target may add).
    Returns the names kept at their initial value."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    allowed = [n for n in missing if n.endswith(EXTRA_TARGET_SUFFIXES)]
    missing = [n for n in missing if n not in allowed]
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise ConversionError(
            f"{where}: the weights do not fit this model: missing {missing} and unexpected {unexpected} "
            f"(only {list(EXTRA_TARGET_SUFFIXES)} may be absent from the source; they start at the identity)"
        )
    mismatched = [f"{n}: source {tuple(state[n].shape)} vs model {tuple(target[n].shape)}"
                  for n in sorted(state) if state[n].shape != target[n].shape]
    if mismatched:
        raise ConversionError(f"{where}: shape mismatch:\n  " + "\n  ".join(mismatched))
    model.load_state_dict({**{n: target[n] for n in allowed}, **state}, strict=True)
    return allowed


def initialize_from(model: torch.nn.Module, init: dict | None) -> str | None:
    """Load the configured initial weights into the freshly built (unwrapped) `model`. Returns a line
    describing what was loaded, or None if no init source is set."""
    init = init or {}
    if not (init.get("from_hf") or init.get("from_checkpoint")):
        return None
    state, source_config, where = _source_weights(init)
    check_same_architecture(source_config, model.config, where)
    kept = load_weights(model, state, where)
    extra = f"; kept at the identity: {len(kept)} feature map(s)" if kept else ""
    return f"initial weights from {where} ({len(state)} tensors) into {model.attention.kind} attention{extra}"
