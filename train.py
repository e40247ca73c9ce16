"""Train GPT-2 or Qwen3 with dense attention, SFA, or the short-embedding baseline.

    python train.py                                        # tiny GPT-2 + SFA k=8 on the embedded corpus
    python train.py model=gpt2_small attention=sfa attention.k=8 data=openwebtext logging=online
    python train.py -m attention=dense,sfa attention.k=4,8,16          # a sweep, one run dir per job
    torchrun --nproc_per_node=8 train.py model=gpt2_small dist=ddp     # or dist=fsdp2

Config: configs/ (Hydra). Files: <root>/runs/<run_name>/ (config.yaml, metrics.jsonl, checkpoints/).
Docs: docs/training.md (how to), docs/metrics.md (what each number means).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data.format import DataFormatError
from data.sources import DatasetUnavailableError, DataSourceError
from data.tokenizers import UnknownTokenizerError
from training import checkpoint as ckpt
from training import conversion
from training import distributed as dist
from training import faults
from training.config_checks import ConfigError, check_config
from training.device_peaks import detect_peak_flops
from training.hydra_setup import register_resolvers
from training.metrics import flops_per_token, mfu, peak_memory_bytes, reset_peak_memory
from training.optim import build_optimizer, build_scheduler
from training.sinks import JsonlSink, Progress, WandbSink, format_record

log = logging.getLogger("train")
register_resolvers()


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


def evaluate(model, cfg: DictConfig, data_dir: Path, info: dist.DistInfo, micro_batch: int) -> float:
    """Loss per target token over the same `eval_batches` val micro-batches every time (a fresh loader per
    call), all processes together."""
    from data.loader import TokenLoader

    from training.validation import token_weighted_loss

    loader = TokenLoader(data_dir, "val", micro_batch, cfg.train.seq_len, info.rank, info.world_size, cfg.train.seed)
    return token_weighted_loss(model, loader.iter_eval_batches(cfg.train.eval_batches), info.device,
                               autocast=lambda: autocast_context(info.device, cfg.train.dtype),
                               all_reduce_sum=lambda t: dist.all_reduce_sum(t, info)).loss


def diagnostics_batch(cfg: DictConfig, data_dir: Path, info: dist.DistInfo, model) -> dict:
    """training/diagnostics.py on the first validation sequence (the same one every time)."""
    from data.loader import TokenLoader

    from training.diagnostics import attention_diagnostics

    x, _ = next(iter(TokenLoader(data_dir, "val", 1, cfg.train.seq_len, 0, 1, cfg.train.seed).iter_eval_batches(1)))
    return attention_diagnostics(model, x.to(info.device), lambda: autocast_context(info.device, cfg.train.dtype))


def save_checkpoint(model, optimizer, scheduler, loader, step, tokens_seen, config, out_dir, info, keep,
                    nonfinite_state=None, elapsed_s=0.0):
    """Collective (every rank calls it): gather full states, rank 0 writes the file atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    loader_states = dist.gather_objects(loader.state_dict(), info)
    rng_states = dist.gather_objects(ckpt.capture_rng_state(), info)
    path = ckpt.checkpoint_path(out_dir, step)
    if info.is_main:
        ckpt.save_atomic(
            {
                "format_version": ckpt.FORMAT_VERSION,
                "step": step,
                "tokens_seen": tokens_seen,
                "elapsed_s": elapsed_s,
                "world_size": info.world_size,
                "config": config,
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "loaders": loader_states,
                "rng": rng_states,
                "nonfinite": nonfinite_state or {},
            },
            path,
            before_rename=(lambda: faults.pause_for_test("checkpoint write", step))
            if faults.test_hook("pause_in_ckpt_write", step) else None,
        )
        ckpt.prune_checkpoints(out_dir, keep)
    dist.barrier(info)
    return path


def write_rank_checksum(model, info: dist.DistInfo, out_dir: Path, step: int) -> None:
    """sha256 of this rank's parameter bytes (DDP replicas must match bit for bit) and their float64 sum."""
    digest, total = hashlib.sha256(), 0.0
    for name, p in dist.unwrap(model).named_parameters():
        local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()  # FSDP2: this rank's shard
        digest.update(name.encode())
        digest.update(local.float().cpu().numpy().tobytes())
        total += local.double().sum().item()
    path = out_dir / "rank_checksums" / f"rank{info.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": info.rank, "step": step, "sha256": digest.hexdigest(), "sum": total}))


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


def train(cfg: DictConfig, out_dir: Path) -> dict:
    info = dist.setup(cfg.dist, cfg.train.device)
    try:
        return _train(cfg, out_dir, info)
    finally:
        faults.restore_signals()  # a run that raised must not leave its SIGTERM/SIGINT handlers behind
        dist.teardown()


def _train(cfg: DictConfig, out_dir: Path, info: dist.DistInfo) -> dict:
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

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    guard = faults.NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_max_consecutive)
    loss_parts = conversion.LossParts(info.device)  # lm_loss / match_loss when the Eq. 8 term is on
    if resume_path is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        payload = ckpt.load_checkpoint(resume_path)
        ckpt.check_compatible(payload, config, info.world_size, resume_path)
        set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        loader.load_state_dict(payload["loaders"][info.rank])
        ckpt.restore_rng_state(payload["rng"][info.rank])
        step, tokens_seen = payload["step"], payload["tokens_seen"]
        elapsed_before = payload.get("elapsed_s", 0.0)  # wall-time curves continue across resumes
        guard.load_state_dict(payload.get("nonfinite", {}))
        log.info("resumed from %s at step %d (%d tokens seen)", resume_path, step, tokens_seen)
        old_steps, old_decay = payload["config"]["train"]["max_steps"], payload["config"]["optim"]["decay_steps"]
        if (old_steps, old_decay) != (cfg.train.max_steps, cfg.optim.decay_steps):
            log.info("extending the run: train.max_steps %s -> %s, optim.decay_steps %s -> %s; the learning rate "
                     "follows the new schedule from here (cosine to step %d)", old_steps, cfg.train.max_steps,
                     old_decay, cfg.optim.decay_steps, plan.decay_steps)
    # Built after the resume, from the current config: a resumed run may move the horizon.
    scheduler = build_scheduler(optimizer, cfg.optim, plan.warmup_steps, plan.decay_steps, step)

    device_name, peak = detect_peak_flops(info.device)
    peak = cfg.metrics.peak_flops or peak
    run_info = {
        "run_name": cfg.run_name, "model": cfg.model.preset, "n_layer": plan.model_config.n_layer,
        "d_model": plan.model_config.d_model, "n_head": plan.model_config.n_head, "seed": cfg.train.seed,
        "params": n_params, "params_nonembedding": n_params_nonembed, **costs,
        "kv_cache_bytes_per_token": kv_bytes, "device": device_name, "world_size": info.world_size,
        "dist": info.mode, "grad_accum": plan.grad_accum, "attention": plan.attention.kind,
        "topk_q": plan.attention.topk_q, "topk_k": plan.attention.topk_k, "d_short": plan.attention.d_short,
        "feature_map": plan.attention.feature_map, "rope": plan.attention.rope, "rope_dims": plan.attention.rope_dims,
        "scale": plan.attention.scale,
        "head_dim": plan.model_config.head_dim, "peak_flops_per_device": peak,
    }
    sinks = [JsonlSink(out_dir, step), WandbSink(cfg.logging, config, out_dir, cfg.run_name)] if info.is_main else []
    if info.is_main:
        (out_dir / "run_info.json").write_text(json.dumps(run_info, indent=2))
        log.info("run dir %s", out_dir)
        log.info("%s (%s) + %s on %s x%d (%s): %.2fM params, %.3g FLOPs/token (dense-equivalent %.3g), "
                 "KV cache %d B/token, grad accumulation %d",
                 cfg.model.preset, model_shape(plan.model_config), cfg.attention.tag, device_name, info.world_size,
                 info.mode, n_params / 1e6, costs["flops_per_token"], costs["dense_equiv_flops_per_token"], kv_bytes, plan.grad_accum)
    progress = Progress(info.is_main, cfg.train.max_steps, step, cfg.train.log_every)

    model.train()
    # elapsed_s counts this run's loop time over all its processes (resumes continue the clock);
    # train.time_limit_s is a budget for this process alone, so it is measured from `started`.
    last_val, last_ckpt, started = None, None, time.perf_counter()
    record: dict = {}
    stop_error: Exception | None = None
    signals = faults.StopSignals().install()  # SIGTERM/SIGINT: finish the step, checkpoint, exit 128+signal
    reset_peak_memory(info.device)
    while step < cfg.train.max_steps:
        t0 = time.perf_counter()
        if faults.test_hook("pause_in_step", step + 1, info.rank):
            faults.pause_for_test("step", step + 1, signals)
        if faults.test_hook("die", step + 1, info.rank) and faults.first_attempt():
            os.kill(os.getpid(), signal.SIGKILL)  # a rank crashing hard, as an OOM kill would
        lr = scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(plan.grad_accum):
            x, y = (t.to(info.device, non_blocking=True) for t in loader.next_batch())
            # Gradients are all-reduced only on the last micro-batch of the step.
            with dist.gradient_sync(model, info, enabled=micro == plan.grad_accum - 1):
                with autocast_context(info.device, cfg.train.dtype):
                    loss, parts = conversion.training_loss(model, x, y, plan.match_loss)
                if faults.test_hook("nan_loss", step + 1, info.rank):
                    loss = loss * float("nan")
                (loss / plan.grad_accum).backward()
            loss_sum += loss.detach().float()
            loss_parts.add(parts)
        if faults.test_hook("nan_grad", step + 1, info.rank):  # a NaN gradient with a finite loss
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        # Both numbers are the same on every rank (loss averaged here, grad norm over all-reduced grads), so
        # every rank takes the same decision without another collective; .item() syncs the device once.
        train_loss = dist.all_reduce_mean(loss_sum / plan.grad_accum, info).item()
        grad_norm = grad_norm.item()
        bad_grads = [] if np.isfinite(grad_norm) else faults.nonfinite_grads(dist.unwrap(model).named_parameters())
        nonfinite = guard.cause(train_loss, grad_norm, bad_grads)
        if guard.decide(step + 1, nonfinite):
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.train.batch_tokens
        step_time = time.perf_counter() - t0
        tokens_per_s = cfg.train.batch_tokens / step_time

        record = {
            "step": step, "tokens": tokens_seen, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "step_time_s": step_time,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
            "flops_per_token": costs["flops_per_token"],
            "dense_equiv_flops_per_token": costs["dense_equiv_flops_per_token"],
            "mfu": mfu(costs["flops_per_token"], tokens_per_s, peak * info.world_size if peak else None),
            "kv_cache_bytes_per_token": kv_bytes, "peak_memory_bytes": peak_memory_bytes(info.device),
            "nonfinite_skipped": guard.skipped,
        }
        if plan.match_loss.enabled:  # "loss" is then the total: lm_loss + convert.match_weight * match_loss
            record.update(loss_parts.means(info))
        if nonfinite:
            record["nonfinite"] = nonfinite
        # Ranks' clocks differ slightly: stop when any rank is out of time, all at the same step.
        out_of_time = cfg.train.time_limit_s is not None and dist.any_rank(
            time.perf_counter() - started >= cfg.train.time_limit_s, info)
        signalled = dist.any_rank(signals.requested, info)  # a signal may reach the ranks at different steps
        stop_nonfinite = guard.should_stop()
        done = step == cfg.train.max_steps or out_of_time or signalled or stop_nonfinite
        if faults.test_hook("pause_in_eval", step, info.rank):
            faults.pause_for_test("eval", step)
        if step == cfg.train.max_steps or out_of_time or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            last_val = evaluate(model, cfg, data_dir, info, plan.micro_batch)
            record.update(val_loss=last_val, val_perplexity=float(np.exp(min(last_val, 50.0))))
        if cfg.train.diagnostics_every and (step % cfg.train.diagnostics_every == 0 or done):  # all ranks (FSDP2 gathers)
            record.update(diagnostics_batch(cfg, data_dir, info, model))
        for sink in sinks:
            sink.write(record)
        progress.update(record)
        if done or (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0):
            last_ckpt = save_checkpoint(model, optimizer, scheduler, loader, step, tokens_seen, config, out_dir,
                                        info, cfg.train.keep_checkpoints, guard.state_dict(), record["elapsed_s"])
        if stop_nonfinite:
            stop_error = faults.NonFiniteError(guard.stop_message(step, nonfinite, last_ckpt))
            break
        if signalled:
            stop_error = faults.StoppedBySignal(signals.received or signal.SIGTERM, step, last_ckpt)
            break
        if out_of_time:
            log.info("train.time_limit_s=%s reached at step %d", cfg.train.time_limit_s, step)
            break

    signals.restore()
    if cfg.train.rank_checksums:
        write_rank_checksum(model, info, out_dir, step)
    progress.close()
    for sink in sinks:
        sink.close()
    if stop_error is not None:
        raise stop_error
    summary = {"out_dir": str(out_dir), "step": step, "tokens": tokens_seen, "loss": record.get("loss"),
               "val_loss": last_val, "checkpoint": str(last_ckpt) if last_ckpt else None}
    if info.is_main:
        if not record:
            log.info("nothing to do: the checkpoint is already at train.max_steps=%d", cfg.train.max_steps)
        log.info("done at step %d: train loss %s, val loss %s", step, summary["loss"], summary["val_loss"])
        print(f"run dir: {out_dir}", flush=True)
    return summary


# Errors in what the user asked for (each message names the key), reported without a traceback.
USER_ERRORS = (ConfigError, ckpt.ResumeError, conversion.ConversionError, faults.PreflightError, DataFormatError,
               DataSourceError, DatasetUnavailableError, UnknownTokenizerError)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Multirun jobs each get their own directory under hydra.sweep.dir; a single run gets out_dir.
    # Record where this job really writes, so its config.yaml tells the truth.
    cfg.out_dir = HydraConfig.get().runtime.output_dir
    try:
        train(cfg, Path(cfg.out_dir))
    except faults.StoppedBySignal as e:
        log.error("%s", e)
        sys.exit(128 + e.signum)  # the shell's convention for "ended by signal N"
    except faults.NonFiniteError as e:
        log.error("%s", e)
        sys.exit(3)
    except USER_ERRORS as e:
        # A bad value, path or resume: the message names the key and the fix; a traceback adds nothing.
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
