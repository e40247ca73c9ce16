"""Process-group setup for torchrun, model wrapping (DDP or FSDP2), gradient-sync control, reductions.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR / MASTER_PORT); without them this is one
process and no process group is created, unless dist=fsdp2 on a GPU, which needs one even alone.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    mode: str  # "none" | "ddp" | "fsdp2"
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def resolve_device(requested: str | torch.device, local_rank: int = 0, *, key: str = "train.device") -> torch.device:
    """The device for `requested`: auto (this process's GPU if there is one, else the CPU), cpu, cuda (this
    process's GPU: local_rank modulo the GPUs), cuda:N, or a torch.device as is. `key` names the setting in
    errors (train.device for train.py, --device for the scripts)."""
    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    kind, _, index = requested.partition(":") if isinstance(requested, str) else ("", "", "")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise ValueError(f"{key} must be one of auto, cpu, cuda; got {requested!r} (cuda:N picks GPU N)")
    if not torch.cuda.is_available():
        raise ValueError(f"{key}={requested} but no CUDA device is available (use {key}=auto or cpu)")
    return torch.device("cuda", int(index) if index else local_rank % torch.cuda.device_count())


def compute_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """A dtype setting (auto | fp32 | bf16, already checked) resolved: bf16 on the GPU for auto or bf16; fp32
    on the CPU unless bf16 is asked for. train.dtype and the evaluation scripts' --dtype both mean this."""
    return torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and device.type == "cuda") else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` (weights stay fp32); a no-op context in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_mode(requested: str, world_size: int) -> str:
    """The parallelism mode for `requested` (dist.mode) with `world_size` processes, or a clear error."""
    if requested not in ("auto", "none", "ddp", "fsdp2"):
        raise ValueError(f"dist.mode must be one of auto, none, ddp, fsdp2; got {requested!r}")
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    if requested == "none" and world_size > 1:
        raise ValueError(
            f"dist=none but torchrun started {world_size} processes; use dist=ddp, dist=fsdp2 or dist=auto"
        )
    return requested


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(dist_cfg, device_request: str) -> DistInfo:
    """Read the torchrun environment, pick the device, and create the process group when one is needed."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    mode = resolve_mode(dist_cfg.mode, world_size)
    device = resolve_device(device_request, local_rank)
    if mode == "fsdp2" and world_size == 1 and device.type == "cpu":
        raise ValueError(
            "dist=fsdp2 on a single CPU process: FSDP2 shards across processes; launch several with "
            "`torchrun --nproc_per_node=N train.py dist=fsdp2` or use dist=none"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    needs_group = world_size > 1 or mode == "fsdp2"
    if needs_group and not dist.is_initialized():
        if world_size == 1:  # FSDP2 on one GPU without torchrun: a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        if _env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # pytorch/pytorch#135712: restarted workers can read the previous attempt's addresses from the
            # store torchrun shares with them, and fail to connect. A store per attempt avoids it.
            logging.getLogger("train").warning(
                "torchrun restarted this job (attempt %s) with its rendezvous store shared with the workers; if "
                "connecting fails, launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/reliability.md)",
                os.environ["TORCHELASTIC_RESTART_COUNT"])
        backend = dist_cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=dist_cfg.timeout_min),
            device_id=device if device.type == "cuda" else None,
        )
    if mode == "ddp" and world_size == 1:
        mode = "none"  # DDP over one process is a no-op wrapper
    return DistInfo(mode=mode, rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of blocks: its largest nn.ModuleList (GPT-2's h, Qwen3's layers)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"dist=fsdp2: found no nn.ModuleList of blocks to shard in {type(model).__name__}")
    return max(lists, key=len)


def wrap_model(model: nn.Module, info: DistInfo, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """DDP or FSDP2 around `model` (already on info.device); unchanged for mode none.

    FSDP2 in a bf16 run (compute_dtype) all-gathers bf16 copies of the fp32 sharded weights and
    reduce-scatters gradients in fp32 (MixedPrecisionPolicy): half the gather traffic, while weights,
    gradients and optimizer state stay fp32. DDP keeps fp32 weights; autocast casts them per op."""
    if info.mode == "ddp":
        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # lazy: heavy, and only dist=fsdp2 needs it

        if compute_dtype == torch.float32:
            policy = MixedPrecisionPolicy()
        else:
            policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        # Shard block by block (each all-gathered just before use), then the root for embeddings/head.
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP and torch.compile wrappers, in either order (FSDP2 modifies the module in
    place, nothing to unwrap there). Parameter names then read as the model's own, without `_orig_mod.`."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, info: DistInfo, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if info.mode == "ddp" and not enabled:
        with model.no_sync():
            yield
    elif info.mode == "fsdp2":
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `value` over all processes (a no-op with one); `value` itself is left as it is."""
    if info.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of `value` over all processes (a no-op with one)."""
    return all_reduce_sum(value, info) / info.world_size if info.world_size > 1 else value


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank (a collective decision, e.g. to stop)."""
    if info.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order (a one-element list with one process)."""
    if info.world_size == 1:
        return [obj]
    # Tensors inside pickled objects do not survive all_gather_object's unpickler in torch 2.13
    # ("UntypedStorage has no attribute dtype"), so ship torch.save bytes and load them back ourselves.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out: list = [None] * info.world_size
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in out]


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()
