"""The `flash` backend: FlashSFA forward + backward in Triton, as torch.library custom ops.

    flash_sfa_attention(q, k, v, *, topk_q, topk_k, causal, scale)

1. Expand q and k once per tensor to masked-dense q̃, k̃ (top-k kept, rest zero). SparseCode inputs
   are scattered; dense inputs go through the fused Triton top-k (sfa.kernels.topk, one pass writing
   q̃). Autograd of this step is what restricts dq and dk to the selected coordinates (a gather at the
   code's indices), so the kernels stay plain dense tiles.
2. `sfa::flash_fwd(q̃, k̃, v, causal, scale) -> (out, lse)` and its backward `sfa::flash_bwd`, linked by
   `register_autograd` and with fake implementations, so torch.compile traces them without breaks.

Supported by the kernels: head dims D, Dv in {16, 32, 64, 128} (tl.dot needs >= 16; larger tiles were
not tuned or tested). Any other D falls back to the fp32-accurate reference with a warning naming the
reason. The kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import math
import warnings

import torch
import triton

from ..backends import Capabilities, register_backend
from ..reference import sfa_attention_reference
from ..topk import SparseCode
from ._config import KERNEL_DTYPES, LOG2E, dot_precision, interpreting
from .flash_bwd import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel, flash_bwd_preprocess_kernel
from .flash_fwd import flash_fwd_kernel
from .masked import masked_features  # fused top-k -> masked-dense rows, straight-through backward

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------
# Launch configurations. The interpreter cannot autotune and is slow per block, so it gets one small
# fixed tile (small enough that the tiny test shapes span several blocks and hit every mask path).
# On the GPU: a table measured with `scripts/bench_attention.py --sweep` (docs/bench/notes_flash.md).
# ---------------------------------------------------------------------------------------------
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)

# (kernel, head_dim) -> config; missing entries use the defaults below. Measured on an H200 (bf16,
# causal, N=8192, B=4, H=16, k=D/8) with `bench_attention.py --sweep`; docs/bench/notes_flash.md.
GPU_CONFIGS: dict[tuple[str, int], dict] = {
    ("fwd", 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ("dkdv", 64): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
    ("dq", 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ("fwd", 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    ("dkdv", 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
    ("dq", 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
}
_GPU_DEFAULTS = {
    "fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "dkdv": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
}


def launch_config(kernel: str, head_dim: int, override: dict | None = None) -> dict:
    """Tile sizes and launch options for `kernel` in {"fwd", "dkdv", "dq"}."""
    if override is not None:
        return dict(override)
    if interpreting():
        return dict(_INTERPRETER_CONFIG)
    return dict(GPU_CONFIGS.get((kernel, head_dim), _GPU_DEFAULTS[kernel]))


def _head_dim_block(dim: int) -> int:
    return triton.next_power_of_2(dim)


# Tests set this to fill every output with NaN before the kernels run, so an element a kernel forgets
# to write fails the comparison instead of passing as whatever the allocator left there.
POISON_OUTPUTS = False


def _new_output(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


# ---------------------------------------------------------------------------------------------
# Launchers (plain functions on masked-dense tensors; the custom ops wrap them).
# ---------------------------------------------------------------------------------------------
def flash_forward(q, k, v, *, causal: bool, scale: float, config: dict | None = None):
    """out (B,Hq,Nq,Dv) in v's dtype and lse (B,Hq,Nq) fp32 (natural log of the scaled scores' sum)."""
    b, hq, n_q, d = q.shape
    hkv, n_k, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = _new_output((b, hq, n_q, dv), v.dtype, q.device)
    lse = _new_output((b, hq, n_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    cfg = launch_config("fwd", d, config)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    grid = (triton.cdiv(n_q, block_m), b * hq)
    flash_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        hq, hq // hkv, n_q, n_k, n_k - n_q, scale * LOG2E.value,
        HEAD_DIM=d, VALUE_DIM=dv, BLOCK_D=_head_dim_block(d), BLOCK_DV=_head_dim_block(dv),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype), **cfg,
    )
    return out, lse


def flash_backward(grad_out, q, k, v, out, lse, *, causal: bool, scale: float, configs: dict | None = None):
    """Gradients (dq̃, dk̃, dv) with respect to the masked-dense q̃, k̃ and v; dk, dv summed over GQA groups."""
    b, hq, n_q, d = q.shape
    hkv, n_k, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    dq = _new_output(q.shape, q.dtype, q.device)
    dk = _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = _new_output(lse.shape, torch.float32, lse.device)
    configs = configs or {}
    block_d, block_dv, precision = _head_dim_block(d), _head_dim_block(dv_dim), dot_precision(q.dtype)

    pre_block = 64 if not interpreting() else 16
    flash_bwd_preprocess_kernel[(triton.cdiv(n_q, pre_block), b * hq)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), *delta.stride(), hq, n_q,
        VALUE_DIM=dv_dim, BLOCK_DV=block_dv, BLOCK_M=pre_block,
    )
    common = dict(HEAD_DIM=d, VALUE_DIM=dv_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=causal,
                  DOT_PRECISION=precision)

    # dQ in a kernel of its own (7 matmuls per block pair, no atomics): folding it into the dK/dV kernel with
    # fp32 atomics (5 matmuls) measured slower on the H200, e.g. 9.48 vs 7.28 ms for the backward at 8k, D=128
    # (docs/bench/attention.md, "Why, with the measurements", point 2).
    cfg = launch_config("dkdv", d, configs.get("dkdv"))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    flash_bwd_dkdv_kernel[(triton.cdiv(n_k, block_n), b * hkv)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(), *dk.stride(), *dv.stride(),
        hkv, group, n_q, n_k, n_k - n_q, scale, scale * LOG2E.value,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **cfg,
    )

    cfg = launch_config("dq", d, configs.get("dq"))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    flash_bwd_dq_kernel[(triton.cdiv(n_q, block_m), b * hq)](
        q, k, v, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride(), *dq.stride(),
        hq, group, n_q, n_k, n_k - n_q, scale, scale * LOG2E.value,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **cfg,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph breaks), differentiable through register_autograd.
# Not kernel_op (sfa/kernels/_config.py) like the top-k ops: inductor, recompiling flash_fwd_kernel as a
# user kernel, fails in Triton's tl.dot on the accumulator (torch 2.11, Triton 3.6, H200, 2026-12-04), likely
# because inductor passes the float scale as fp64 (docs/benchmarks.md "Kernel ops as triton_op").
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("sfa::flash_fwd", mutates_args=())
def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashSFA forward on masked-dense q̃ (B,Hq,Nq,D), k̃ (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv) -> (out, lse)."""
    return flash_forward(q, k, v, causal=causal, scale=scale)


@flash_fwd.register_fake
def _flash_fwd_fake(q, k, v, causal, scale):
    b, hq, n_q, _ = q.shape
    return q.new_empty((b, hq, n_q, v.shape[-1]), dtype=v.dtype), q.new_empty((b, hq, n_q), dtype=torch.float32)


@torch.library.custom_op("sfa::flash_bwd", mutates_args=())
def flash_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashSFA backward: (dq̃, dk̃, dv), dense in the masked-dense inputs; dk, dv summed over each GQA group."""
    return flash_backward(grad_out, q, k, v, out, lse, causal=causal, scale=scale)


@flash_bwd.register_fake
def _flash_bwd_fake(grad_out, q, k, v, out, lse, causal, scale):
    # The kernels write fresh contiguous gradients; empty_like would copy a strided input's layout
    # (e.g. v as a transposed view of the projection), and compiled graphs then view them wrongly.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.sfa.flash_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The backend entry (arguments already validated by sfa.ops.sfa_attention).
# ---------------------------------------------------------------------------------------------
def unsupported_reason(q, v) -> str | None:
    """Why the kernels cannot take these inputs (None when they can)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS or dv not in SUPPORTED_HEAD_DIMS:
        return f"head dims D={d}, Dv={dv} not in the kernel's supported set {SUPPORTED_HEAD_DIMS}"
    return None


def flash_sfa_attention(
    q: torch.Tensor | SparseCode,
    k: torch.Tensor | SparseCode,
    v: torch.Tensor,
    *,
    topk_q: int,
    topk_k: int,
    causal: bool = True,
    scale: float | None = None,
    dense_dims: int = 0,
) -> torch.Tensor:
    """SFA through the FlashSFA kernels; same contract as sfa.sfa_attention_reference. Decoupled rows
    (dense_dims > 0) need nothing of the kernels: their masked-dense q̃, k̃ simply keep the leading dims."""
    if not (v.is_cuda or interpreting()):
        raise RuntimeError(
            f"flash backend: the Triton kernels need CUDA tensors (got device {v.device}); on CPU use "
            "backend='reference', or set TRITON_INTERPRET=1 before importing sfa.kernels to run them interpreted"
        )
    reason = unsupported_reason(q, v)
    if reason is not None:
        warnings.warn(f"flash backend: {reason}; falling back to the reference backend", stacklevel=2)
        return sfa_attention_reference(q, k, v, topk_q=topk_q, topk_k=topk_k, causal=causal, scale=scale,
                                       dense_dims=dense_dims)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    q_masked = masked_features(q, topk_q, dense_dims)
    k_masked = masked_features(k, topk_k, dense_dims)
    out, _ = torch.ops.sfa.flash_fwd(q_masked, k_masked, v, bool(causal), float(scale))
    return out


# Chosen only by name, never by auto: on the H200 `masked` (cuDNN on the same masked-dense tiles) was faster at
# 71 of the 72 measured points (N 1k-32k, D 64/128, three k, forward and forward+backward) and within noise at
# the last (docs/bench/attention.md, "Where flash beats masked"; docs/benchmarks.md).
register_backend(
    "flash", flash_sfa_attention,
    Capabilities(devices=("cuda",), dtypes=KERNEL_DTYPES, head_dims=SUPPORTED_HEAD_DIMS),
    priority=None,
)
