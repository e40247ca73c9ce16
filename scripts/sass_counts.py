"""Static instruction counts of two kernels, compiled for sm_90 on any machine: no GPU needed, no timing taken.

Triton's compiler, ptxas and cuobjdump ship in the triton wheel, so a kernel can be compiled for Hopper and its
SASS counted here. A count is not a speed, but it says whether a kernel can reach its byte floor at all: an SM
issues 4 warp instructions (128 thread instructions) a cycle and, at an H200's ~4.8 TB/s over 132 SMs at
~1.98 GHz, receives ~18 bytes a cycle, so a kernel that spends more than ~7 thread instructions per byte it moves
is bound by instruction issue, not by memory.

    python scripts/sass_counts.py [--out F]

Cases (the launch arguments the GPU path uses, floats fp32 and 16-byte aligned pointers and strides, as Triton's
JIT specializes them):
  topk    sfa/kernels/topk.py's kernel on bf16 rows, D = 64, k = 8, writing the masked rows (GPT-2 small's q and
          k at k = d/8), for each autotune config: thread instructions per row.
  decode  sfa/kernels/decode.py's split kernel at Qwen3-0.6B's heads (16 query heads over 8 KV heads, D = Dv = 128,
          k = 16) in its GPU plan, SFA codes and dense keys, 1, 4 and 8 query tokens: thread instructions per key
          in the key loop (the loop body's SASS, times the threads, over the keys a pass covers).
Prints a table and writes JSON (--out, else $OUT/sass_counts.json).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results_out import write_results  # noqa: E402

from sfa.kernels._config import interpreting, next_pow2  # noqa: E402
from sfa.kernels.decode import (GPU_DECODE_CONFIG, GPU_DECODE_CONFIG_FP32, GPU_DECODE_CONFIG_WIDE,  # noqa: E402
                                GPU_DENSE_DECODE_CONFIG, GPU_DENSE_DECODE_CONFIG_FP32, GPU_DENSE_DECODE_CONFIG_WIDE,
                                _decode_split_kernel, _launch_config)
from sfa.kernels.topk import _GPU_CONFIGS, _topk_rows_kernel  # noqa: E402

BYTES_PER_ISSUE = 128 / 18  # thread instructions an SM issues per byte it receives at the byte floor (docstring)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T] )?([A-Z0-9]+)[.A-Z0-9]*([^;]*);")


def compile_for_sm90(kernel, signature: dict, constexprs: dict, aligned=(), num_warps: int = 4, num_stages: int = 3):
    """`kernel` through Triton's compiler and ptxas for sm_90, no GPU needed; `aligned` names the arguments
    Triton's JIT would specialize as 16-divisible (pointers and strides)."""
    names = [p.name for p in kernel.params]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def sass(kernel, signature: dict, constexprs: dict, aligned: list[str], num_warps: int, num_stages: int = 3):
    """[(address, opcode, operands)] of `kernel` compiled for sm_90."""
    compiled = compile_for_sm90(kernel, signature, constexprs, aligned, num_warps, num_stages)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return [(int(a, 16), op, rest) for a, op, rest in SASS_LINE.findall(text)]


def loop_body(instructions) -> list[str]:
    """Opcodes of the longest loop: the span from a backward branch's target to the branch."""
    best: list[str] = []
    for address, op, rest in instructions:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [o for a, o, _ in instructions if start <= a <= address]
            best = body if len(body) > len(best) else best
    return best


def _signature(kernel, pointers: dict, constexprs: dict) -> dict:
    sig = {}
    for p in kernel.params:
        sig[p.name] = "constexpr" if p.is_constexpr else pointers.get(p.name, "i32")
    return sig


def topk_rows() -> list[dict]:
    kernel = _topk_rows_kernel
    pointers = {"X": "*bf16", "VALUES": "*bf16", "INDICES": "*u8", "MASKED": "*bf16"}
    rows = []
    for config in _GPU_CONFIGS:
        block_r, warps = config.kwargs["BLOCK_R"], config.num_warps
        constexprs = dict(D=64, D_PAD=64, K=8, K_PAD=8, KEY64=False, WRITE_MASKED=True, BLOCK_R=block_r)
        code = sass(kernel, _signature(kernel, pointers, constexprs), constexprs,
                    [*pointers, "stride_x_row"], warps)
        per_row = len(code) * 32 * warps / block_r
        bytes_per_row = 64 * 2 + 8 * 2 + 8 + 64 * 2  # the row in; values, indices and the masked row out
        rows.append(dict(case="topk", config=f"BLOCK_R={block_r} warps={warps}", instructions=len(code),
                         thread_instructions_per_row=round(per_row), bytes_per_row=bytes_per_row,
                         per_byte=round(per_row / bytes_per_row, 2), top=dict(collections.Counter(
                             op for _, op, _ in code).most_common(5))))
    return rows


def decode_keys() -> list[dict]:
    kernel = _decode_split_kernel
    pointers = {n: "*bf16" for n in ("Q", "Q_COLS", "K_VAL", "K_DENSE", "V")}
    pointers.update(K_IDX="*u8", O_PART="*fp32", LSE_PART="*fp32", N_VALID="*i32", scale_log2="fp32")
    aligned = [n for n in pointers if n != "scale_log2"]
    aligned += [p.name for p in kernel.params if p.name.startswith("stride_") and p.name != "stride_nb"]
    group, d, k = 2, 128, 16
    tables = {"sfa": (GPU_DECODE_CONFIG, GPU_DECODE_CONFIG_WIDE, GPU_DECODE_CONFIG_FP32),
              "dense": (GPU_DENSE_DECODE_CONFIG, GPU_DENSE_DECODE_CONFIG_WIDE, GPU_DENSE_DECODE_CONFIG_FP32)}
    rows = []
    for tokens in (1, 4, 8):
        n_rows = next_pow2(group * tokens)
        q, kv = (torch.empty(1, heads, length, d, dtype=torch.bfloat16, device="meta")
                 for heads, length in ((8 * group, tokens), (8, 1)))
        for mode in ("sfa", "dense"):
            plan = _launch_config(None, q, kv, kv, *tables[mode])  # the plan decode_into / dense_decode_into take
            ksel = k if mode == "sfa" else 0
            constexprs = dict(GROUP=group, ROWS=n_rows, KSEL=ksel, KSEL_PAD=next_pow2(ksel), DENSE_DIMS=0 if ksel else d,
                              DENSE_PAD=2 if ksel else d, DV=d, DV_PAD=d, BLOCK_L=plan["BLOCK_L"], CAUSAL=True,
                              DOT_PRECISION="tf32", HAS_N_VALID=True,
                              QUERY_COLUMNS=bool(plan.get("QUERY_COLUMNS")) and bool(ksel))
            code = sass(kernel, _signature(kernel, pointers, constexprs), constexprs, aligned,
                        plan["num_warps"], plan["num_stages"])
            body = loop_body(code)
            per_key = len(body) * 32 * plan["num_warps"] / plan["BLOCK_L"]
            bytes_per_key = 3 * k + 2 * d if ksel else 4 * d
            rows.append(dict(case="decode", config=f"{mode} T={tokens} rows={n_rows}", loop_instructions=len(body),
                             thread_instructions_per_key=round(per_key), bytes_per_key=bytes_per_key,
                             per_byte=round(per_key / bytes_per_key, 2),
                             top=dict(collections.Counter(body).most_common(5))))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    if interpreting():
        sys.exit("sass_counts.py compiles with Triton's real compiler: unset TRITON_INTERPRET")
    rows = topk_rows() + decode_keys()
    print(f"\n{'case':<7} {'config':<24} {'thread instr':>12} {'bytes':>6} {'per byte':>9}  (issue-bound above "
          f"~{BYTES_PER_ISSUE:.1f})")
    for r in rows:
        per = r.get("thread_instructions_per_row", r.get("thread_instructions_per_key"))
        unit = "row" if r["case"] == "topk" else "key"
        print(f"{r['case']:<7} {r['config']:<24} {per:>8} /{unit} {r.get('bytes_per_row', r.get('bytes_per_key')):>6} "
              f"{r['per_byte']:>9.2f}")
    result = dict(script="sass_counts.py", target="sm_90", triton=triton.__version__,
                  issue_bound_above_per_byte=round(BYTES_PER_ISSUE, 2), rows=rows)
    for path in write_results(result, args.out, "sass_counts.json"):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
