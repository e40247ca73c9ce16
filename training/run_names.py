"""Default run names: a readable part and a short hash of everything that defines the run.

    gpt2_tiny-sfa-q8k8-de02fe            python train.py
    gpt2_tiny-L2-d128-dense-f7bbae       python train.py model.n_layer=2 model.d_model=128 attention=dense

The hash covers exactly what a resume compares (training.checkpoint.IDENTITY_KEYS: model, attention,
data, optimizer, seq_len, batch_tokens, seed, conversion loss) plus the initial weights (`init`), so two
configs share a directory only if one may resume the other. It leaves out what may change on resume:
the horizon (`train.max_steps`, `optim.decay_steps`: rerunning the same command with more steps extends
the run), intervals, logging, `attention.backend` and paths. The readable part only helps people: the
model preset, the shape overrides given on the command line, the attention tag.
"""

from __future__ import annotations

import hashlib
import json

from training.checkpoint import IDENTITY_KEYS, identity_leaves

# Model overrides worth spelling out in the name (every override is in the hash anyway).
SHAPE_TAGS = (("n_layer", "L"), ("d_model", "d"), ("n_head", "h"), ("head_dim", "hd"))


def config_hash(cfg: dict, exclude: tuple[str, ...] = ()) -> str:
    """6 hex digits of a sha256 over the run's identity and initial weights, without the `exclude` leaves
    (scripts/plot_runs.py leaves out train.seed to find the seeds of one arm)."""
    leaves = identity_leaves(cfg, (*IDENTITY_KEYS, "init"))
    kept = {k: v for k, v in leaves.items() if k not in exclude}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:6]


def default_run_name(cfg: dict) -> str:
    """<preset>[-L<n_layer>][-d<d_model>][-h<n_head>][-hd<head_dim>]-<attention tag>-<hash>."""
    model = cfg["model"]
    parts = [str(model["preset"])]
    parts += [f"{tag}{model[key]}" for key, tag in SHAPE_TAGS if model.get(key) is not None]
    parts += [str(cfg["attention"]["tag"]), config_hash(cfg)]
    return "-".join(parts)
