"""One training run: set up, resume, then train_step / log / evaluate / checkpoint until done.

    run = setup(cfg, out_dir, info)          # checks, data, model, optimizer, resume from a checkpoint
    while run.step < max_steps:
        pending.append(train_step(run))      # queued on the device; the host does not wait for it
        if sync_due(step):                   # a log step, an evaluation, a checkpoint, the end
            records = read_steps(run, pending)   # the one device-to-host read, the non-finite guard
            evaluate / write records / checkpoint / stop

train.py is the Hydra entry point around `train`. Docs: docs/training.md (the loop, when it syncs),
docs/metrics.md (the records), docs/reliability.md (signals, non-finite steps, kills).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
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
from training.batches import Prefetcher
from training.config_checks import Plan, check_config
from training.device_peaks import detect_peak_flops
from training.metrics import flops_per_token, mfu, peak_memory_bytes, reset_peak_memory
from training.optim import build_optimizer, build_scheduler, clip_gradients
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
        return autocast_context(self.info.device, self.cfg.train.dtype)


@dataclass
class StepStats:
    """What one optimizer step measured, as tensors on the device until the loop reads them."""

    step: int
    tokens: int  # tokens consumed up to this step, all processes
    lr: float
    loss: torch.Tensor  # mean over the micro-batches and processes
    grad_norm: torch.Tensor  # global L2 norm before clipping
    parts: dict[str, torch.Tensor]  # lm_loss / match_loss of a conversion run (else empty)
    grad_norms: torch.Tensor  # each gradient's norm, to name the culprits of a non-finite step
    grad_names: tuple[str, ...]  # the parameters of grad_norms, in order


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


def compute_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """train.dtype resolved: bf16 on the GPU (auto or bf16); fp32 on the CPU unless bf16 is asked for."""
    return torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and device.type == "cuda") else torch.float32


def autocast_context(device: torch.device, dtype: str):
    """Autocast to the run's compute dtype (weights stay fp32); nothing in an fp32 run."""
    if compute_dtype(device, dtype) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(device, dtype))


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


def compile_model(model: torch.nn.Module, mode: str, backend: str) -> None:
    """torch.compile in place (the module keeps its class and parameter names), fullgraph so that a graph
    break is an error, not a silent slowdown. The whole model alone or under DDP (whose hooks run outside,
    on the gradients); each transformer block under FSDP2, whose all-gather hooks run between the blocks."""
    for module in dist.transformer_blocks(model) if mode == "fsdp2" else [model]:
        module.compile(backend=backend, fullgraph=True)
    log.info("torch.compile (%s, fullgraph) of %s", backend, "each block" if mode == "fsdp2" else "the model")


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

    if cfg.train.compile:
        compile_model(model, info.mode, cfg.train.compile_backend)
    model = dist.wrap_model(model, info, compute_dtype(info.device, cfg.train.dtype))
    optimizer = build_optimizer(model, cfg.optim)
    loader = TokenLoader(data_dir, "train", plan.micro_batch, cfg.train.seq_len, info.rank, info.world_size, cfg.train.seed)
    device_name, peak = detect_peak_flops(info.device)
    run = Run(cfg=cfg, config=config, plan=plan, info=info, out_dir=out_dir, data_dir=data_dir, model=model,
              optimizer=optimizer, scheduler=None, batches=Prefetcher(loader, info.device),
              guard=faults.NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_max_consecutive),
              costs=costs, kv_bytes=kv_bytes, peak_flops=cfg.metrics.peak_flops or peak,
              named_parameters=list(dist.unwrap(model).named_parameters()))
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
    run.batches.load_state_dict(payload["loaders"][run.info.rank])
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
    step is non-finite, the schedule. Nothing here waits for the device: the numbers stay tensors."""
    model, plan, info, step = run.model, run.plan, run.info, run.step + 1
    lr = run.scheduler.get_last_lr()[0]
    loss_sum = torch.zeros((), device=info.device)
    parts_sum: dict[str, torch.Tensor] = {}
    for micro in range(plan.grad_accum):
        x, y = run.batches.next_batch()
        # Gradients are all-reduced only on the last micro-batch of the step.
        with dist.gradient_sync(model, info, enabled=micro == plan.grad_accum - 1):
            with run.autocast():
                loss, parts = conversion.training_loss(model, x, y, plan.match_loss)
            (loss / plan.grad_accum).backward()
        loss_sum += loss.detach().float()
        for name, value in (parts or {}).items():
            parts_sum[name] = parts_sum.get(name, 0.0) + value
    loss_sum = faults.inject(step, info.rank, loss_sum, model.parameters(), run.signals)  # test-only
    with_grads = [(name, p) for name, p in run.named_parameters if p.grad is not None]
    clip = run.cfg.optim.grad_clip if run.cfg.optim.grad_clip > 0 else float("inf")
    grad_norm, grad_norms = clip_gradients([p for _, p in with_grads], clip)
    # Loss (averaged here) and grad norm (over all-reduced gradients) are the same on every rank, so
    # every rank takes the same skip decision without another collective.
    loss = dist.all_reduce_mean(loss_sum / plan.grad_accum, info)
    run.optimizer.found_inf = run.guard.skip_update(loss, grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step = step
    run.tokens_seen += run.cfg.train.batch_tokens
    parts = {k: dist.all_reduce_mean(v / plan.grad_accum, info) for k, v in sorted(parts_sum.items())}
    return StepStats(step=step, tokens=run.tokens_seen, lr=lr, loss=loss, grad_norm=grad_norm, parts=parts,
                     grad_norms=grad_norms, grad_names=tuple(name for name, _ in with_grads))


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
    with torch.compiler.set_stance("force_eager"):  # the statistics path is Python, not for the graph
        return attention_diagnostics(run.model, x.to(run.info.device), run.autocast)


def save_checkpoint(run: Run, elapsed_s: float) -> Path:
    """Collective (every rank calls it): gather full states, rank 0 writes the file atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    info, step = run.info, run.step
    model_state, optim_state = get_state_dict(
        run.model, run.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    loader_states = dist.gather_objects(run.batches.state_dict(), info)
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


FLOP_KEYS = ("flops_per_token", "dense_equiv_flops_per_token")
# With train.log_every=0 (no console lines) the host still reads the device this often, so that stop
# requests from other ranks and a growing backlog of step tensors are dealt with.
SYNC_EVERY_WITHOUT_LOG = 100


def read_steps(run: Run, pending: list[StepStats], window_s: float, window_start_s: float) -> list[dict]:
    """The metrics.jsonl records of the steps since the last read (docs/metrics.md), with one device-to-
    host copy for all of them. The steps share the window's wall time evenly: the host, running ahead,
    never saw where one step ended on the device. Each step then goes through the non-finite guard, in
    order; the steps after one that met its stop condition (whose updates the device already skipped)
    say so in `update_skipped`."""
    rows = [torch.cat([s.loss.view(1).float(), s.grad_norm.view(1).float(),
                       *(v.view(1).float() for v in s.parts.values()), s.grad_norms.float()]) for s in pending]
    values = torch.cat(rows).tolist()  # the one sync
    batch_tokens, n = run.cfg.train.batch_tokens, len(pending)
    tokens_per_s = batch_tokens * n / window_s
    peak_total = run.peak_flops * run.info.world_size if run.peak_flops else None
    common = {
        "tokens_per_s": tokens_per_s, "step_time_s": window_s / n, **{k: run.costs[k] for k in FLOP_KEYS},
        "mfu": mfu(run.costs["flops_per_token"], tokens_per_s, peak_total),
        "kv_cache_bytes_per_token": run.kv_bytes, "peak_memory_bytes": peak_memory_bytes(run.info.device),
    }
    records, offset = [], 0
    for i, stats in enumerate(pending):
        width = 2 + len(stats.parts) + len(stats.grad_names)
        row, offset = values[offset:offset + width], offset + width
        loss, grad_norm = row[0], row[1]
        record = {"step": stats.step, "tokens": stats.tokens, "loss": loss, "lr": stats.lr, "grad_norm": grad_norm,
                  "elapsed_s": run.elapsed_before + window_start_s + (i + 1) * window_s / n, **common}
        # "loss" is then the total: lm_loss + convert.match_weight * match_loss
        record.update(zip(stats.parts, row[2:2 + len(stats.parts)]))
        if run.stopping is not None:
            record["update_skipped"] = f"stopping after non-finite step {run.stopping[0]}"
        else:
            bad = [] if math.isfinite(grad_norm) else faults.nonfinite_names(stats.grad_names, row[2 + len(stats.parts):])
            cause = run.guard.cause(loss, grad_norm, bad)
            run.guard.decide(stats.step, cause)
            if cause:
                record["nonfinite"] = cause
            if run.guard.should_stop():
                run.stopping = (stats.step, cause)
        record["nonfinite_skipped"] = run.guard.skipped
        records.append(record)
    return records


def sync_due(cfg, step: int) -> bool:
    """Steps at which the host reads the device: log lines, evaluations, diagnostics, checkpoints, the end."""
    every = [cfg.log_every or SYNC_EVERY_WITHOUT_LOG, cfg.eval_every, cfg.diagnostics_every, cfg.ckpt_every]
    return step == cfg.max_steps or any(n and step % n == 0 for n in every)


def loop(run: Run) -> dict:
    """Steps until train.max_steps, the time limit, a stop signal or the non-finite guard; evaluation,
    diagnostics and checkpoints when due. Between sync points (sync_due) the host only queues work.
    Returns the summary train.py prints."""
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
    pending: list[StepStats] = []
    window_start = started  # when the host last waited for the device
    while run.step < train_cfg.max_steps:
        pending.append(train_step(run))
        step = run.step
        out_of_time = train_cfg.time_limit_s is not None and time.perf_counter() - started >= train_cfg.time_limit_s
        # Alone, a stop request is known at once; across ranks, agreeing on it is a collective, left to sync points.
        stop_here = info.world_size == 1 and (out_of_time or signals.requested)
        if not (sync_due(train_cfg, step) or stop_here):
            continue

        now = time.perf_counter()
        records = read_steps(run, pending, now - window_start, window_start - started)
        pending, record = [], records[-1]
        # Ranks' clocks differ slightly: stop when any rank is out of time, all at the same step.
        out_of_time = dist.any_rank(out_of_time, info)
        signalled = dist.any_rank(signals.requested, info)  # a signal may reach the ranks at different steps
        done = step == train_cfg.max_steps or out_of_time or signalled or run.stopping is not None
        if step == train_cfg.max_steps or out_of_time or (train_cfg.eval_every and step % train_cfg.eval_every == 0):
            if faults.test_hook("pause_in_eval", step, info.rank):
                faults.pause_for_test("eval", step)
            last_val = evaluate(run)
            record.update(val_loss=last_val, val_perplexity=float(np.exp(min(last_val, 50.0))))
        if train_cfg.diagnostics_every and (step % train_cfg.diagnostics_every == 0 or done):  # all ranks (FSDP2 gathers)
            record.update(diagnostics(run))
        for r in records:
            for sink in sinks:
                sink.write(r)
            progress.update(r)
        if done or (train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0):
            last_ckpt = save_checkpoint(run, record["elapsed_s"])
        if run.stopping is not None:
            stop_error = faults.NonFiniteError(run.guard.stop_message(*run.stopping, last_ckpt))
            break
        if signalled:
            stop_error = faults.StoppedBySignal(signals.received or signal.SIGTERM, step, last_ckpt)
            break
        if out_of_time:
            log.info("train.time_limit_s=%s reached at step %d", train_cfg.time_limit_s, step)
            break
        window_start = time.perf_counter()

    signals.restore()
    run.batches.close()
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
