"""One training run: set up, resume, then train_step / log / evaluate / checkpoint until done.

    run = setup(cfg, out_dir, info)       # checks, data, model, optimizer, resume from a checkpoint
    while run.step < max_steps:
        stats = train_step(run)           # forward/backward over the micro-batches, clip, update
        records = log_steps(run, [stats]) # the numbers the host reads, one record per step
        evaluate / checkpoint / stop when due

train.py is the Hydra entry point around `train`. Docs: docs/training.md (the loop), docs/metrics.md (the
records), docs/reliability.md (signals, non-finite steps, kills).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from training import checkpoint as ckpt
from training import conversion
from training import distributed as dist
from training import faults
from training.config_checks import Plan, check_config
from training.device_peaks import detect_peak_flops
from training.metrics import flops_per_token, mfu, peak_memory_bytes, reset_peak_memory
from training.optim import build_optimizer, build_scheduler
from training.sinks import JsonlSink, Progress, WandbSink
from training.validation import token_weighted_loss

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
    loader: object  # data.loader.TokenLoader of this rank's training windows
    guard: faults.NonFiniteGuard
    costs: dict  # flops_per_token and dense_equiv_flops_per_token
    kv_bytes: int
    peak_flops: float | None  # per device; None: no MFU
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # loop time of the processes before the last resume
    signals: faults.StopSignals = field(default_factory=faults.StopSignals)

    def autocast(self):
        return autocast_context(self.info.device, self.cfg.train.dtype)


@dataclass
class StepStats:
    """What one optimizer step measured, as tensors on the device."""

    step: int
    tokens: int  # tokens consumed up to this step, all processes
    lr: float
    loss: torch.Tensor  # mean over the micro-batches and processes
    grad_norm: torch.Tensor  # global L2 norm before clipping
    parts: dict[str, torch.Tensor]  # lm_loss / match_loss of a conversion run (else empty)
    nonfinite: str | None = None  # what was not finite, when the update was skipped


def train(cfg: DictConfig, out_dir: Path) -> dict:
    """Train as `cfg` says, writing into `out_dir`; returns a summary (steps, losses, last checkpoint)."""
    info = dist.setup(cfg.dist, cfg.train.device)
    try:
        return loop(setup(cfg, out_dir, info))
    finally:
        faults.restore_signals()  # a run that raised must not leave its SIGTERM/SIGINT handlers behind
        dist.teardown()


# ------------------------------------------------------------------------------------------------ setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on the GPU (dtype=auto or bf16); fp32 on the CPU unless dtype=bf16."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_data(cfg: DictConfig, info: dist.DistInfo) -> Path:
    """Rank 0 prepares the token shards (once, cached under data.root); the others wait, then reuse them."""
    from data.prepare import ensure_prepared

    d = cfg.data
    if d.get("dir"):  # already prepared (e.g. by scripts/niah.py make-data): validate, never re-prepare
        from training.prepared_data import prepared_dir

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


def setup(cfg: DictConfig, out_dir: Path, info: dist.DistInfo) -> Run:
    """Check the config, prepare the run directory and data, build the model (initial weights or a
    checkpoint's), wrap and compile it, and build the optimizer, schedule and data loader."""
    from data.format import check_vocab, read_meta
    from data.loader import TokenLoader
    from models import build_model

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
    costs = flops_per_token(model, cfg.train.seq_len)
    kv_bytes = model.kv_cache_bytes_per_token(torch.bfloat16)
    n_params, n_params_nonembed = model.num_params(), model.num_params(exclude_embeddings=True)
    if info.is_main:
        faults.preflight_disk_space(out_dir, n_params, cfg.train.min_free_gb)
    seed_everything(cfg.train.seed + info.rank)

    if cfg.train.compile and info.mode != "fsdp2":
        model = torch.compile(model)
    model = dist.wrap_model(model, info)
    if cfg.train.compile and info.mode == "fsdp2":
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg.optim)
    loader = TokenLoader(data_dir, "train", plan.micro_batch, cfg.train.seq_len, info.rank, info.world_size, cfg.train.seed)
    device_name, peak = detect_peak_flops(info.device)
    run = Run(cfg=cfg, config=config, plan=plan, info=info, out_dir=out_dir, data_dir=data_dir, model=model,
              optimizer=optimizer, scheduler=None, loader=loader,
              guard=faults.NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_max_consecutive),
              costs=costs, kv_bytes=kv_bytes, peak_flops=cfg.metrics.peak_flops or peak)
    if resume_path is not None:
        resume(run, resume_path)
    # Built after the resume, from the current config: a resumed run may move the horizon.
    run.scheduler = build_scheduler(optimizer, cfg.optim, plan.warmup_steps, plan.decay_steps, run.step)

    if info.is_main:
        att, shape = plan.attention, plan.model_config
        run_info = {
            "run_name": cfg.run_name, "model": cfg.model.preset, "n_layer": shape.n_layer, "d_model": shape.d_model,
            "n_head": shape.n_head, "seed": cfg.train.seed, "params": n_params, "params_nonembedding": n_params_nonembed,
            **costs, "kv_cache_bytes_per_token": kv_bytes, "device": device_name, "world_size": info.world_size,
            "dist": info.mode, "grad_accum": plan.grad_accum, "attention": att.kind, "topk_q": att.topk_q,
            "topk_k": att.topk_k, "d_short": att.d_short, "feature_map": att.feature_map, "rope": att.rope,
            "rope_dims": att.rope_dims, "scale": att.scale, "head_dim": shape.head_dim,
            "peak_flops_per_device": run.peak_flops,
        }
        (out_dir / "run_info.json").write_text(json.dumps(run_info, indent=2))
        log.info("run dir %s", out_dir)
        log.info("%s (%s) + %s on %s x%d (%s): %.2fM params, %.3g FLOPs/token (dense-equivalent %.3g), "
                 "KV cache %d B/token, grad accumulation %d",
                 cfg.model.preset, model_shape(shape), cfg.attention.tag, device_name, info.world_size, info.mode,
                 n_params / 1e6, costs["flops_per_token"], costs["dense_equiv_flops_per_token"], kv_bytes,
                 plan.grad_accum)
    return run


def resume(run: Run, path: Path) -> None:
    """Load a checkpoint into the run: weights, optimizer, this rank's data position and RNG, the step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    cfg = run.cfg
    payload = ckpt.load_checkpoint(path)
    ckpt.check_compatible(payload, run.config, run.info.world_size, path)
    set_state_dict(run.model, run.optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    run.loader.load_state_dict(payload["loaders"][run.info.rank])
    ckpt.restore_rng_state(payload["rng"][run.info.rank])
    run.step, run.tokens_seen = payload["step"], payload["tokens_seen"]
    run.elapsed_before = payload.get("elapsed_s", 0.0)  # wall-time curves continue across resumes
    run.guard.load_state_dict(payload.get("nonfinite", {}))
    log.info("resumed from %s at step %d (%d tokens seen)", path, run.step, run.tokens_seen)
    old_steps, old_decay = payload["config"]["train"]["max_steps"], payload["config"]["optim"]["decay_steps"]
    if (old_steps, old_decay) != (cfg.train.max_steps, cfg.optim.decay_steps):
        log.info("extending the run: train.max_steps %s -> %s, optim.decay_steps %s -> %s; the learning rate "
                 "follows the new schedule from here (cosine to step %d)", old_steps, cfg.train.max_steps,
                 old_decay, cfg.optim.decay_steps, run.plan.decay_steps)


# ------------------------------------------------------------------------------------------------- step


def train_step(run: Run) -> StepStats:
    """One optimizer step: gradient accumulation over the micro-batches, clipping, the update unless the
    step is non-finite, the schedule."""
    model, plan, info, step = run.model, run.plan, run.info, run.step + 1
    lr = run.scheduler.get_last_lr()[0]
    loss_sum = torch.zeros((), device=info.device)
    parts_sum: dict[str, torch.Tensor] = {}
    for micro in range(plan.grad_accum):
        x, y = (t.to(info.device, non_blocking=True) for t in run.loader.next_batch())
        # Gradients are all-reduced only on the last micro-batch of the step.
        with dist.gradient_sync(model, info, enabled=micro == plan.grad_accum - 1):
            with run.autocast():
                loss, parts = conversion.training_loss(model, x, y, plan.match_loss)
            (loss / plan.grad_accum).backward()
        loss_sum += loss.detach().float()
        for name, value in (parts or {}).items():
            parts_sum[name] = parts_sum.get(name, 0.0) + value
    loss_sum = faults.inject(step, info.rank, loss_sum, model.parameters(), run.signals)  # test-only
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    # Both numbers are the same on every rank (loss averaged here, grad norm over all-reduced grads), so
    # every rank takes the same decision without another collective.
    loss = dist.all_reduce_mean(loss_sum / plan.grad_accum, info)
    bad_grads = [] if torch.isfinite(grad_norm) else faults.nonfinite_grads(dist.unwrap(model).named_parameters())
    cause = run.guard.cause(loss.item(), grad_norm.item(), bad_grads)
    if run.guard.decide(step, cause):
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step = step
    run.tokens_seen += run.cfg.train.batch_tokens
    parts = {k: dist.all_reduce_mean(v / plan.grad_accum, info) for k, v in sorted(parts_sum.items())}
    return StepStats(step=step, tokens=run.tokens_seen, lr=lr, loss=loss, grad_norm=grad_norm, parts=parts,
                     nonfinite=cause)


# ----------------------------------------------------------------------------- evaluate, log, checkpoint


def evaluate(run: Run) -> float:
    """Loss per target token over the same `eval_batches` val micro-batches every time (a fresh loader per
    call), all processes together."""
    from data.loader import TokenLoader

    cfg, info = run.cfg, run.info
    loader = TokenLoader(run.data_dir, "val", run.plan.micro_batch, cfg.train.seq_len, info.rank, info.world_size,
                         cfg.train.seed)
    return token_weighted_loss(run.model, loader.iter_eval_batches(cfg.train.eval_batches), info.device,
                               autocast=run.autocast, all_reduce_sum=lambda t: dist.all_reduce_sum(t, info)).loss


def diagnostics(run: Run) -> dict:
    """training/diagnostics.py on the first validation sequence (the same one every time)."""
    from data.loader import TokenLoader

    from training.diagnostics import attention_diagnostics

    val = TokenLoader(run.data_dir, "val", 1, run.cfg.train.seq_len, 0, 1, run.cfg.train.seed)
    x, _ = next(iter(val.iter_eval_batches(1)))
    return attention_diagnostics(run.model, x.to(run.info.device), run.autocast)


def save_checkpoint(run: Run, elapsed_s: float) -> Path:
    """Collective (every rank calls it): gather full states, rank 0 writes the file atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    info, step = run.info, run.step
    model_state, optim_state = get_state_dict(
        run.model, run.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    loader_states = dist.gather_objects(run.loader.state_dict(), info)
    rng_states = dist.gather_objects(ckpt.capture_rng_state(), info)
    path = ckpt.checkpoint_path(run.out_dir, step)
    if info.is_main:
        ckpt.save_atomic(
            {
                "format_version": ckpt.FORMAT_VERSION, "step": step, "tokens_seen": run.tokens_seen,
                "elapsed_s": elapsed_s, "world_size": info.world_size, "config": run.config,
                "model": model_state, "optimizer": optim_state, "scheduler": run.scheduler.state_dict(),
                "loaders": loader_states, "rng": rng_states, "nonfinite": run.guard.state_dict(),
            },
            path,
            before_rename=(lambda: faults.pause_for_test("checkpoint write", step))
            if faults.test_hook("pause_in_ckpt_write", step) else None,
        )
        ckpt.prune_checkpoints(run.out_dir, run.cfg.train.keep_checkpoints)
    dist.barrier(info)
    return path


def write_rank_checksum(run: Run) -> None:
    """sha256 of this rank's parameter bytes (DDP replicas must match bit for bit) and their float64 sum."""
    digest, total = hashlib.sha256(), 0.0
    for name, p in dist.unwrap(run.model).named_parameters():
        local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()  # FSDP2: this rank's shard
        digest.update(name.encode())
        digest.update(local.float().cpu().numpy().tobytes())
        total += local.double().sum().item()
    path = run.out_dir / "rank_checksums" / f"rank{run.info.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": run.info.rank, "step": run.step, "sha256": digest.hexdigest(), "sum": total}))


def step_record(run: Run, stats: StepStats, step_time: float, elapsed_s: float) -> dict:
    """The metrics.jsonl record of one step (docs/metrics.md)."""
    tokens_per_s = run.cfg.train.batch_tokens / step_time
    peak_total = run.peak_flops * run.info.world_size if run.peak_flops else None
    record = {
        "step": stats.step, "tokens": stats.tokens, "loss": stats.loss.item(),
        "lr": stats.lr, "grad_norm": stats.grad_norm.item(), "tokens_per_s": tokens_per_s,
        "step_time_s": step_time, "elapsed_s": elapsed_s, **{k: run.costs[k] for k in FLOP_KEYS},
        "mfu": mfu(run.costs["flops_per_token"], tokens_per_s, peak_total),
        "kv_cache_bytes_per_token": run.kv_bytes, "peak_memory_bytes": peak_memory_bytes(run.info.device),
        "nonfinite_skipped": run.guard.skipped,
    }
    # "loss" is then the total: lm_loss + convert.match_weight * match_loss
    record.update({name: value.item() for name, value in stats.parts.items()})
    if stats.nonfinite:
        record["nonfinite"] = stats.nonfinite
    return record


FLOP_KEYS = ("flops_per_token", "dense_equiv_flops_per_token")


def loop(run: Run) -> dict:
    """Steps until train.max_steps, the time limit, a stop signal or the non-finite guard; evaluation,
    diagnostics and checkpoints when due. Returns the summary train.py prints."""
    cfg, info = run.cfg, run.info
    train_cfg = cfg.train
    sinks = [JsonlSink(run.out_dir, run.step), WandbSink(cfg.logging, run.config, run.out_dir, cfg.run_name)] \
        if info.is_main else []
    progress = Progress(info.is_main, train_cfg.max_steps, run.step, train_cfg.log_every)
    run.model.train()
    # elapsed_s counts this run's loop time over all its processes (resumes continue the clock);
    # train.time_limit_s is a budget for this process alone, so it is measured from `started`.
    last_val, last_ckpt, started = None, None, time.perf_counter()
    record: dict = {}
    stop_error: Exception | None = None
    signals = run.signals.install()  # SIGTERM/SIGINT: finish the step, checkpoint, exit 128+signal
    reset_peak_memory(info.device)
    while run.step < train_cfg.max_steps:
        t0 = time.perf_counter()
        stats = train_step(run)
        step = run.step
        now = time.perf_counter()
        record = step_record(run, stats, now - t0, run.elapsed_before + now - started)
        # Ranks' clocks differ slightly: stop when any rank is out of time, all at the same step.
        out_of_time = train_cfg.time_limit_s is not None and dist.any_rank(
            time.perf_counter() - started >= train_cfg.time_limit_s, info)
        signalled = dist.any_rank(signals.requested, info)  # a signal may reach the ranks at different steps
        stop_nonfinite = run.guard.should_stop()
        done = step == train_cfg.max_steps or out_of_time or signalled or stop_nonfinite
        if step == train_cfg.max_steps or out_of_time or (train_cfg.eval_every and step % train_cfg.eval_every == 0):
            if faults.test_hook("pause_in_eval", step, info.rank):
                faults.pause_for_test("eval", step)
            last_val = evaluate(run)
            record.update(val_loss=last_val, val_perplexity=float(np.exp(min(last_val, 50.0))))
        if train_cfg.diagnostics_every and (step % train_cfg.diagnostics_every == 0 or done):  # all ranks (FSDP2 gathers)
            record.update(diagnostics(run))
        for sink in sinks:
            sink.write(record)
        progress.update(record)
        if done or (train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0):
            last_ckpt = save_checkpoint(run, record["elapsed_s"])
        if stop_nonfinite:
            stop_error = faults.NonFiniteError(run.guard.stop_message(step, stats.nonfinite, last_ckpt))
            break
        if signalled:
            stop_error = faults.StoppedBySignal(signals.received or signal.SIGTERM, step, last_ckpt)
            break
        if out_of_time:
            log.info("train.time_limit_s=%s reached at step %d", train_cfg.time_limit_s, step)
            break

    signals.restore()
    if train_cfg.rank_checksums:
        write_rank_checksum(run)
    progress.close()
    for sink in sinks:
        sink.close()
    if stop_error is not None:
        raise stop_error
    summary = {"out_dir": str(run.out_dir), "step": run.step, "tokens": run.tokens_seen, "loss": record.get("loss"),
               "val_loss": last_val, "checkpoint": str(last_ckpt) if last_ckpt else None}
    if info.is_main:
        if not record:
            log.info("nothing to do: the checkpoint is already at train.max_steps=%d", train_cfg.max_steps)
        log.info("done at step %d: train loss %s, val loss %s", run.step, summary["loss"], summary["val_loss"])
        print(f"run dir: {run.out_dir}", flush=True)
    return summary
