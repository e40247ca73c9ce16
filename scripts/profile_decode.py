"""Run the SFA decode kernel (and cuDNN dense decode) at one shape, a few times, for a profiler.

Not a benchmark (scripts/bench_decode.py times things): this gives Nsight Compute a steady kernel to look at,
for the "what limits decode" question in docs/bench/topk_decode.md. Example on a GPU machine:

    ncu --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        python scripts/profile_decode.py --batch 8 --context 131072
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import sfa  # noqa: E402
from sfa.kernels import decode as decode_mod  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--dense", action="store_true", help="also run cuDNN dense decode on the same shape")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py: needs a CUDA GPU")
    torch.manual_seed(0)
    shape = (args.batch, args.kv_heads, args.context, args.d)
    q = torch.randn(args.batch, args.q_heads, 1, args.d, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    code = sfa.topk_sparsify(keys, args.k)
    q_masked = sfa.topk_mask(q, args.k)
    out = torch.empty_like(q)
    for _ in range(args.iters):
        decode_mod.decode_into(q_masked, code.values, code.indices, v, out, scale=1 / math.sqrt(args.d), causal=True)
        if args.dense:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(q, keys, v, enable_gqa=True)
    torch.cuda.synchronize()
    print("ran", args.iters, "decode steps at", vars(args))


if __name__ == "__main__":
    main()
