"""One training run: set up, resume, then train_step / log / evaluate / checkpoint until done.

    run = setup(cfg, out_dir, info)          # training/run_setup.py: checks, data, model, optimizer, resume
    while run.step < max_steps:
        pending.append(train_step(run))      # queued on the device; the host does not wait for it
        if sync_due(step):                   # a log step, an evaluation, a checkpoint, the end
            records = read_steps(run, pending)   # the one device-to-host read, the non-finite guard
            evaluate / write records / checkpoint / stop

train.py is the Hydra entry point around `train`. Docs: docs/training.md (the loop, when it syncs),
docs/metrics.md (the records), docs/reliability.md (signals, non-finite steps, kills).
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from data.loader import TokenLoader
from training import checkpoint as ckpt
from training import conversion
from training import distributed as dist
from training import faults
from training.diagnostics import attention_diagnostics
from training.metrics import mfu, peak_memory_bytes, reset_peak_memory
from training.optim import clip_gradients
from training.run_setup import Run, setup
from training.sinks import JsonlSink, Progress, WandbSink
from training.validation import token_weighted_loss

log = logging.getLogger("train")


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
    cfg, info = run.cfg, run.info
    loader = TokenLoader(run.data_dir, "val", run.plan.micro_batch, cfg.train.seq_len, info.rank, info.world_size,
                         cfg.train.seed)
    return token_weighted_loss(run.model, loader.iter_eval_batches(cfg.train.eval_batches), info.device,
                               autocast=run.autocast, all_reduce_sum=lambda t: dist.all_reduce_sum(t, info)).loss


def diagnostics(run: Run) -> dict:
    """training/diagnostics.py on the first validation sequence (the same one every time)."""
    val = TokenLoader(run.data_dir, "val", 1, run.cfg.train.seq_len, 0, 1, run.cfg.train.seed)
    x, _ = next(iter(val.iter_eval_batches(1)))
    with torch.compiler.set_stance("force_eager"):  # the statistics path is Python, not for the graph
        return attention_diagnostics(run.model, x.to(run.info.device), run.autocast)


def save_checkpoint(run: Run, elapsed_s: float) -> Path:
    """Collective (every rank calls it): gather full states, rank 0 writes the file atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # lazy: heavy (~0.7 s)

    started = time.perf_counter()
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
    if info.is_main:  # scripts/summarize_scaleup.py reads this line
        log.info("checkpoint %s saved in %.1f s", path.name, time.perf_counter() - started)
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


def every(n: int, step: int) -> bool:
    """True at every n-th step; never for n = 0 (off)."""
    return bool(n) and step % n == 0


def sync_due(cfg, step: int) -> bool:
    """Steps at which the host reads the device: log lines, evaluations, diagnostics, checkpoints, the end."""
    intervals = (cfg.log_every or SYNC_EVERY_WITHOUT_LOG, cfg.eval_every, cfg.diagnostics_every, cfg.ckpt_every)
    return step == cfg.max_steps or any(every(n, step) for n in intervals)


def read_steps(run: Run, pending: list[StepStats], window_s: float, window_start_s: float) -> list[dict]:
    """The metrics.jsonl records of the steps since the last read (docs/metrics.md), from one device-to-
    host copy for all of them, each reviewed by the non-finite guard in step order. The steps share the
    window's wall time evenly: the host, running ahead, never saw where one step ended on the device."""
    rows = [torch.cat([s.loss.view(1), s.grad_norm.view(1), *(v.view(1) for v in s.parts.values()),
                       s.grad_norms]).float() for s in pending]
    values = torch.cat(rows).tolist()  # the one sync
    n, tokens_per_s = len(pending), run.cfg.train.batch_tokens * len(pending) / window_s
    peak_total = run.peak_flops * run.info.world_size if run.peak_flops else None
    common = {
        "tokens_per_s": tokens_per_s, "step_time_s": window_s / n, **{k: run.costs[k] for k in FLOP_KEYS},
        "mfu": mfu(run.costs["flops_per_token"], tokens_per_s, peak_total),
        "kv_cache_bytes_per_token": run.kv_bytes, "peak_memory_bytes": peak_memory_bytes(run.info.device),
    }
    records, offset = [], 0
    for i, stats in enumerate(pending):
        loss, grad_norm, *rest = values[offset:offset + len(rows[i])]
        offset += len(rows[i])
        parts, grad_norms = rest[:len(stats.parts)], rest[len(stats.parts):]
        record = {"step": stats.step, "tokens": stats.tokens, "loss": loss, "lr": stats.lr, "grad_norm": grad_norm,
                  "elapsed_s": run.elapsed_before + window_start_s + (i + 1) * window_s / n, **common,
                  **dict(zip(stats.parts, parts))}  # with parts, "loss" is lm_loss + convert.match_weight * match_loss
        review_nonfinite(run, record, faults.nonfinite_names(stats.grad_names, grad_norms))
        records.append(record)
    return records


def review_nonfinite(run: Run, record: dict, bad_grads: list[str]) -> None:
    """The host half of the non-finite guard (the device already skipped the update): count and log a
    bad step, note in `run.stopping` the one that ends the run, and mark the steps after it, whose
    updates the device skipped too until this read."""
    if run.stopping is not None:
        record["update_skipped"] = f"stopping after non-finite step {run.stopping[0]}"
    else:
        cause = run.guard.cause(record["loss"], record["grad_norm"], bad_grads)
        run.guard.decide(record["step"], cause)
        if cause:
            record["nonfinite"] = cause
        if run.guard.should_stop():
            run.stopping = (record["step"], cause)
    record["nonfinite_skipped"] = run.guard.skipped


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
        if step == train_cfg.max_steps or out_of_time or every(train_cfg.eval_every, step):
            if faults.test_hook("pause_in_eval", step, info.rank):
                faults.pause_for_test("eval", step)
            last_val = evaluate(run)
            record.update(val_loss=last_val, val_perplexity=float(np.exp(min(last_val, 50.0))))
        if train_cfg.diagnostics_every and (every(train_cfg.diagnostics_every, step) or done):  # all ranks
            record.update(diagnostics(run))
        for r in records:
            for sink in sinks:
                sink.write(r)
            progress.update(r)
        if done or every(train_cfg.ckpt_every, step):
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
