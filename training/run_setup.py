"""The state of one training run and how it is set up: `setup(cfg, out_dir, info) -> Run` checks the config,
prepares the run directory and data, builds the model (initial weights, or a checkpoint's through
`resume`), compiles and wraps it, and builds the optimizer, schedule and batches. training/loop.py runs it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data.format import check_vocab, read_meta
from data.loader import TokenLoader
from data.prepare import ensure_prepared
from data.prepared_data import prepared_dir
from models import build_model
from training import checkpoint as ckpt
from training import conversion
from training import distributed as dist
from training import faults
from training.batches import Prefetcher
from training.run_config import Plan, check_config
from training.device_peaks import detect_peak_flops
from training.metrics import flops_per_token
from training.optim import build_optimizer, build_scheduler

log = logging.getLogger("train")


@dataclass
class Run:
    """Everything a step, an evaluation or a checkpoint needs, built by `setup`."""

    cfg: DictConfig
    config: dict  # the resolved config as plain data (saved in every checkpoint)
    plan: Plan
    info: dist.DistInfo
    out_dir: Path
    data_dir: Path
    model: torch.nn.Module  # wrapped (DDP / FSDP2) and compiled as configured
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Prefetcher  # this rank's training micro-batches, read one ahead, on the device
    guard: faults.NonFiniteGuard
    costs: dict  # flops_per_token and dense_equiv_flops_per_token
    kv_bytes: int
    peak_flops: float | None  # per device; None: no MFU
    named_parameters: list  # (name, parameter) of the plain model, as the optimizer sees them
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # loop time of the processes before the last resume
    signals: faults.StopSignals = field(default_factory=faults.StopSignals)
    stopping: tuple[int, str] | None = None  # (step, cause) once the non-finite guard ends the run

    def autocast(self):
        return dist.autocast(self.info.device, dist.compute_dtype(self.info.device, self.cfg.train.dtype))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(cfg: DictConfig, info: dist.DistInfo) -> Path:
    """Rank 0 prepares the token shards (once, cached under data.root); the others wait, then reuse them."""
    d = cfg.data
    if d.get("dir"):  # already prepared (e.g. by scripts/niah.py make-data): validate, never re-prepare
        return prepared_dir(d.dir, d.tokenizer)
    source = OmegaConf.to_container(d.source) if OmegaConf.is_list(d.source) else d.source
    options = dict(max_tokens=d.max_tokens, val_fraction=d.val_fraction, hf_split=d.hf_split, text_field=d.text_field)
    for key in ("corpus_dir", "train_parts"):  # only the package corpora's configs have these
        if d.get(key) is not None:
            options[key] = d[key]
    if info.is_main:
        ensure_prepared(source=source, tokenizer=d.tokenizer, root=d.root, **options)
    dist.barrier(info)
    return Path(ensure_prepared(source=source, tokenizer=d.tokenizer, root=d.root, **options))


def resume_from(cfg: DictConfig, out_dir: Path) -> Path | None:
    """The checkpoint to resume: out_dir's newest (auto), none, a given file, or a given run dir's newest."""
    if cfg.train.resume == "none":
        earlier = ckpt.latest_checkpoint(out_dir)
        if earlier is not None:  # a fresh run here would mix its checkpoints with the old run's
            raise ckpt.ResumeError(
                f"train.resume=none but {earlier.parent} holds checkpoints of an earlier run (newest {earlier.name}); "
                "delete that folder to start over there, or give this run another run_name=... or out_dir=..."
            )
        return None
    if cfg.train.resume == "auto":
        return ckpt.latest_checkpoint(out_dir)
    path = Path(cfg.train.resume)
    if path.is_dir():  # a run directory, as init.from_checkpoint and the eval tools take
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise ckpt.ResumeError(f"train.resume={path}: that run directory has no {ckpt.CHECKPOINT_DIR}/step_*.pt")
        return found
    return path


def model_shape(config) -> str:
    """layers x width x heads of a model config, e.g. '4L x 256d x 4h' (the preset name alone hides overrides)."""
    return f"{config.n_layer}L x {config.d_model}d x {config.n_head}h"


def compile_model(model: torch.nn.Module, mode: str, backend: str) -> None:
    """torch.compile in place (the module keeps its class and parameter names), fullgraph so that a graph
    break is an error, not a silent slowdown. The whole model alone or under DDP (whose hooks run outside,
    on the gradients); each transformer block under FSDP2, whose all-gather hooks run between the blocks."""
    for module in dist.transformer_blocks(model) if mode == "fsdp2" else [model]:
        module.compile(backend=backend, fullgraph=True)
    log.info("torch.compile (%s, fullgraph) of %s", backend, "each block" if mode == "fsdp2" else "the model")


def setup(cfg: DictConfig, out_dir: Path, info: dist.DistInfo) -> Run:
    """Everything before the first step; a run with a checkpoint in `out_dir` (or train.resume) resumes it."""
    config = OmegaConf.to_container(cfg, resolve=True)
    plan = check_config(config, info.world_size)
    if not info.is_main:
        log.setLevel(logging.WARNING)
    if info.is_main:
        faults.preflight_out_dir(out_dir)  # before any work: an unwritable run dir fails now, not at the first save
        for partial in ckpt.remove_partial_saves(out_dir):
            log.warning("removed %s, left by a checkpoint save that was interrupted", partial.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)

    data_dir = prepare_data(cfg, info)
    check_vocab(read_meta(data_dir), plan.model_config.vocab_size)

    # Same seed on every rank for the weights (FSDP2 shards each rank's own copy); per-rank streams after.
    seed_everything(cfg.train.seed)
    for warning in plan.warnings:
        log.warning("%s", warning)
    model = build_model(plan.model_config, plan.attention).to(info.device)
    resume_path = resume_from(cfg, out_dir)
    if resume_path is None:  # a run with its own checkpoint resumes from it, never re-initialises
        loaded = conversion.initialize_from(model, config.get("init"))
        if loaded:
            log.info("%s", loaded)
    if info.is_main:
        faults.preflight_disk_space(out_dir, model.num_params(), cfg.train.min_free_gb)
    seed_everything(cfg.train.seed + info.rank)
    described = describe(model, cfg, plan, info)

    if cfg.train.compile:
        compile_model(model, info.mode, cfg.train.compile_backend)
    model = dist.wrap_model(model, info, dist.compute_dtype(info.device, cfg.train.dtype))
    optimizer = build_optimizer(model, cfg.optim)
    loader = TokenLoader(data_dir, "train", plan.micro_batch, cfg.train.seq_len, info.rank, info.world_size, cfg.train.seed)
    run = Run(cfg=cfg, config=config, plan=plan, info=info, out_dir=out_dir, data_dir=data_dir, model=model,
              optimizer=optimizer, scheduler=None, batches=Prefetcher(loader, info.device),
              guard=faults.NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_max_consecutive),
              costs={k: described[k] for k in ("flops_per_token", "dense_equiv_flops_per_token")},
              kv_bytes=described["kv_cache_bytes_per_token"], peak_flops=described["peak_flops_per_device"],
              named_parameters=list(dist.unwrap(model).named_parameters()))
    if resume_path is not None:
        resume(run, resume_path)
    # Built after the resume, from the current config: a resumed run may move the horizon.
    run.scheduler = build_scheduler(optimizer, cfg.optim, plan.warmup_steps, plan.decay_steps, run.step)
    if info.is_main:
        (out_dir / "run_info.json").write_text(json.dumps(described, indent=2))
        log.info("run dir %s", out_dir)
        log.info("%s (%s) + %s on %s x%d (%s): %.2fM params, %.3g FLOPs/token (dense-equivalent %.3g), "
                 "KV cache %d B/token, grad accumulation %d",
                 cfg.model.preset, model_shape(plan.model_config), cfg.attention.tag, described["device"],
                 info.world_size, info.mode, described["params"] / 1e6, described["flops_per_token"],
                 described["dense_equiv_flops_per_token"], described["kv_cache_bytes_per_token"], plan.grad_accum)
    return run


def describe(model, cfg: DictConfig, plan: Plan, info: dist.DistInfo) -> dict:
    """The run's constants (run_info.json, docs/metrics.md): shape, parameters, FLOPs and KV-cache bytes
    per token, device and its peak, parallelism, attention."""
    device_name, peak = detect_peak_flops(info.device)
    att, shape = plan.attention, plan.model_config
    return {
        "run_name": cfg.run_name, "model": cfg.model.preset, "n_layer": shape.n_layer, "d_model": shape.d_model,
        "n_head": shape.n_head, "seed": cfg.train.seed, "params": model.num_params(),
        "params_nonembedding": model.num_params(exclude_embeddings=True), **flops_per_token(model, cfg.train.seq_len),
        "kv_cache_bytes_per_token": model.kv_cache_bytes_per_token(torch.bfloat16), "device": device_name,
        "world_size": info.world_size, "dist": info.mode, "grad_accum": plan.grad_accum, "attention": att.kind,
        "topk_q": att.topk_q, "topk_k": att.topk_k, "d_short": att.d_short, "feature_map": att.feature_map,
        "rope": att.rope, "rope_dims": att.rope_dims, "rope_shared": att.rope_shared, "scale": att.scale,
        "head_dim": shape.head_dim,
        "peak_flops_per_device": cfg.metrics.peak_flops or peak,
    }


def resume(run: Run, path: Path) -> None:
    """Load a checkpoint into the run: weights, optimizer, this rank's data position and RNG, the step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict  # lazy: heavy (~0.7 s)

    started = time.perf_counter()
    cfg = run.cfg
    payload = ckpt.load_checkpoint(path)
    ckpt.check_compatible(payload, run.config, run.info.world_size, path)
    set_state_dict(run.model, run.optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    run.batches.load_state_dict(payload["loaders"][run.info.rank])
    ckpt.restore_rng_state(payload["rng"][run.info.rank])
    run.step, run.tokens_seen = payload["step"], payload["tokens_seen"]
    run.elapsed_before = payload.get("elapsed_s", 0.0)  # wall-time curves continue across resumes
    run.guard.load_state_dict(payload.get("nonfinite", {}))
    log.info("resumed from %s at step %d (%d tokens seen) in %.1f s", path, run.step, run.tokens_seen,
             time.perf_counter() - started)
    old_steps, old_decay = payload["config"]["train"]["max_steps"], payload["config"]["optim"]["decay_steps"]
    if (old_steps, old_decay) != (cfg.train.max_steps, cfg.optim.decay_steps):
        log.info("extending the run: train.max_steps %s -> %s, optim.decay_steps %s -> %s; the learning rate "
                 "follows the new schedule from here (cosine to step %d)", old_steps, cfg.train.max_steps,
                 old_decay, cfg.optim.decay_steps, run.plan.decay_steps)
