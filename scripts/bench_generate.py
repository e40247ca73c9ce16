"""End-to-end generation benchmark: prefill time, decode ms/step, tokens/s, KV-cache bytes and peak memory of
dense, SFA and short attention on Qwen3-0.6B and GPT-2 small shapes (random weights, bf16), each decode step
set against its byte floor, and HF transformers' own generate (static cache, compiled) on the same weights.

    python scripts/bench_generate.py                                    # the default grid, ~5 min on one H200
    python scripts/bench_generate.py --models qwen3_0.6b --contexts 16384,32768,65536,131072 --batches 1,4,8,16,max
    python scripts/bench_generate.py --quick                            # tiny shapes on CPU, seconds (CI)

Per (model, attention, batch, context) row: the decode engine of models/decoding.py (`--modes`: graph = CUDA
graphs, compile = torch.compile reduce-overhead, eager) times `--steps` steps after its warm-up/capture;
the cache holds `context` positions. Prefill is real (random prompt, chunked) where batch x context <=
--prefill-tokens (the first such row of each model also reports `prefill_cold_ms`, a prefill run before it that
pays the process's one-time costs, so that `prefill_ms` is warm); elsewhere the cache is filled with random keys
and values instead, since a decode step's
cost does not depend on what the cache holds. "max" is the largest batch whose cache fits the free memory
(less a margin). The byte floor of a step is (weight bytes read + batch x context x KV bytes per token) / the
device-to-device copy bandwidth measured in the same run (read + write bytes over time, as
scripts/bench_decode.py); it counts the valid context, not the cache's capacity, because on CUDA every kind's
step reads only the valid keys (SFA's and dense's split-KV decode kernels, sfa/kernels/decode.py). HF rows (`--hf-at B:CTX`): transformers' generate with a StaticCache on the model
to_hf builds from ours, timed as (t(steps) - t(1)) / (steps - 1), beside ours with a real prefill of the same
prompt; `same_tokens` says whether the greedy tokens agree. HF cannot run the short baseline (no HF equivalent),
and runs SFA with its keys dense in its own cache (it has no compressed cache). Prints a table and writes JSON
(--out, and $OUT/generate.json when $OUT is set). Results and discussion: docs/inference.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_out import write_results  # noqa: E402
from models import build_model  # noqa: E402
from models.decoding import WARMUP_STEPS, Decoder, available_bytes  # noqa: E402

DEFAULTS = dict(models="qwen3_0.6b,gpt2_small", attentions="dense,sfa,short", batches="1,4,16,max",
                contexts="4096,32768,131072", steps=32, modes="graph", compile_at="4:32768",
                compile_models="qwen3_0.6b", compile_attentions="dense,sfa", hf_at="4:4096", prefill_tokens=131072, max_batch=1024, dtype="bf16",
                device="cuda")
QUICK = dict(models="gpt2_tiny,qwen3_tiny", batches="1,2,max", contexts="48,96", steps=3, modes="eager",
             compile_at="", hf_at="2:32", prefill_tokens=10**9, max_batch=4, dtype="fp32", device="cpu")
# CPU-sized shapes for --quick (real presets otherwise; max_seq_len always grows to fit the contexts)
QUICK_OVERRIDES = dict(n_layer=2, vocab_size=512)
TIMED_WARMUP = WARMUP_STEPS + 3  # eager warm-up, then capture (graph) or compile + record (reduce-overhead)
FIT_MARGIN = 0.9, 2 * 2**30  # a "max" batch may use 90% of the free memory less 2 GiB (activations, graphs)


PLAN_KEYS = ("BLOCK_L", "PROGRAMS_PER_SM", "SPLIT_CAP", "MIN_KEYS_PER_SPLIT", "MIN_PROGRAMS_PER_SM", "num_warps",
             "num_stages", "maxnreg")
MAY_BE_ZERO = ("MIN_KEYS_PER_SPLIT", "MIN_PROGRAMS_PER_SM")  # 0: no minimum chunk, no floor on the programs


def decode_plan(text: str) -> dict:
    """'SPLIT_CAP=128,num_stages=3' -> {'SPLIT_CAP': 128, 'num_stages': 3}; ValueError naming what is wrong."""
    plan = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        least = 0 if key in MAY_BE_ZERO else 1
        if not sep or key not in PLAN_KEYS or not value.isdigit() or int(value) < least:
            raise ValueError(f"{item!r} must be KEY=INT (>= 1; {' and '.join(MAY_BE_ZERO)} >= 0) with KEY one of "
                             f"{', '.join(PLAN_KEYS)}")
        plan[key] = int(value)
    return plan


def apply_decode_plan(plan: dict) -> None:
    """Run this process's SFA decode steps (one query row per sequence) with `plan` over the shipped launch plan."""
    if plan:
        from sfa.kernels import decode as decode_kernel  # lazy: the override is all this script needs of it

        decode_kernel.GPU_DECODE_CONFIG.update(plan)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (seconds); other flags still apply")
    p.add_argument("--models", help=f"presets (default {DEFAULTS['models']})")
    p.add_argument("--attentions", help="dense,sfa,short (default all)")
    p.add_argument("--k", type=int, default=16, help="SFA features kept per q/k row (default 16)")
    p.add_argument("--d-short", type=int, default=24, help="short baseline q/k width (default 24: SFA k=16's cache bytes)")
    p.add_argument("--batches", help=f"comma list, 'max' = the largest that fits (default {DEFAULTS['batches']})")
    p.add_argument("--contexts", help=f"cached positions per sequence (default {DEFAULTS['contexts']})")
    p.add_argument("--steps", type=int, help="timed decode steps (default 32)")
    p.add_argument("--modes", help="graph,compile,eager for the whole grid (default graph)")
    p.add_argument("--compile-at", help="B:CTX points also timed with mode=compile (default 4:32768; '' = none)")
    p.add_argument("--compile-models", help="models the compile points run on (default qwen3_0.6b)")
    p.add_argument("--compile-attentions", help="attentions the compile points run on (default dense,sfa)")
    p.add_argument("--hf-at", help="B:CTX points where HF generate runs as the peer (default 4:4096; '' = none)")
    p.add_argument("--prefill-tokens", type=int, help="real prefill where batch x context <= this (default 131072)")
    p.add_argument("--max-batch", type=int, help="cap on the 'max' batch (default 1024)")
    p.add_argument("--dtype", choices=("bf16", "fp32"))
    p.add_argument("--device")
    p.add_argument("--decode-plan", default="",
                   help="KEY=INT,... overrides of the SFA decode kernel's launch plan for this run "
                        "(sfa.kernels.decode.GPU_DECODE_CONFIG, e.g. SPLIT_CAP=128,num_stages=3: the plan "
                        "scripts/bench_decode.py's sweep found best for Qwen3-0.6B's heads); CUDA only")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    try:
        args.decode_plan = decode_plan(args.decode_plan)
    except ValueError as e:
        p.error(f"--decode-plan {args.decode_plan!r}: {e}")
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def points(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in point.split(":")) for point in text.split(",") if point]


def device_and_dtype(args, script: str, cpu_hint: str = "use --quick (CPU) or --device cpu") -> tuple:
    """The run's torch device and dtype from --device / --dtype, refusing CUDA where there is none."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script}: no CUDA device; {cpu_hint}")
    return device, torch.bfloat16 if args.dtype == "bf16" else torch.float32


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device) -> float:
    sync(device)
    return time.perf_counter()


def environment(device, dtype) -> dict:
    """What a measurement ran on: the device and the versions that decide its kernels."""
    try:  # only the HF peer rows need it; without it they say so
        import transformers  # lazy: optional, see above
    except ImportError:
        transformers = None
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, transformers=transformers and transformers.__version__, dtype=str(dtype),
               python=platform.python_version())
    if device.type == "cuda":
        import triton  # lazy: only its version, and only on CUDA

        env.update(triton=triton.__version__, cudnn=torch.backends.cudnn.version())
    return env


def copy_bandwidth_gbps(device) -> float:
    """Device-to-device copy rate, (read + write bytes) / time, of a buffer far larger than any cache level."""
    n = (256 if device.type == "cuda" else 16) * 2**20
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    reps = 20 if device.type == "cuda" else 3
    start = now(device)
    for _ in range(reps):
        y.copy_(x)
    seconds = (now(device) - start) / reps
    return 2 * x.numel() * x.element_size() / seconds / 1e9


def attention_config(name: str, args) -> dict | None:
    return {"dense": None, "sfa": {"kind": "sfa", "topk_q": args.k}, "short": {"kind": "short", "d_short": args.d_short}}[name]


def make_model(preset: str, attention: str, max_len: int, args, device, dtype):
    torch.manual_seed(0)  # dense and SFA share every weight (same shapes, same seed)
    overrides = {**(QUICK_OVERRIDES if args.quick else {}), "max_seq_len": max_len}
    model = build_model(preset, attention_config(attention, args), **overrides).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # at the init scale the logits are nearly flat and greedy choices near-ties, which
        for p in model.parameters():  # would make the token comparison with HF meaningless; speed is unaffected
            p.add_(torch.randn_like(p), alpha=0.05)
    return model


def weight_bytes_read(model) -> int:
    """Bytes of parameters a decode step reads: all, except the input tables it only looks one row up in
    (GPT-2's positions; an untied token embedding)."""
    skip = {id(model.embed_tokens.weight)} if model.lm_head.weight is not model.embed_tokens.weight else set()
    if hasattr(model, "transformer"):
        skip.add(id(model.transformer.wpe.weight))
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def max_batch(model, capacity: int, cap: int) -> int:
    free = available_bytes(model.lm_head.weight.device) or 0
    usable = FIT_MARGIN[0] * free - FIT_MARGIN[1]
    return max(0, min(cap, int(usable // (model.kv_cache_bytes_per_token(model.lm_head.weight.dtype) * capacity))))


def fill_randomly(decoder: Decoder, length: int) -> None:
    """Stand in for a prefill of `length` positions: random keys/values (SFA: random codes) in the cache."""
    for layer in decoder.cache.layers:
        for t in layer.tensors():
            if t.is_floating_point():
                t.normal_()
            else:  # SFA column indices
                t.random_(layer.dense_dims, layer.head_dim)
    decoder.tokens.random_(0, decoder.model.config.vocab_size)
    decoder.position.fill_(length)
    decoder.prompt_length = length


def ready_decoder(model, batch: int, context: int, steps: int, mode: str, *, real_prefill: bool, prompt=None,
                  sampler=None) -> tuple[Decoder, float | None]:
    """A Decoder whose cache holds `context` positions (a real prefill, or a random fill), past its
    warm-up/capture steps, with room for `steps` more; and the prefill's ms (None for a random fill)."""
    capacity = context + TIMED_WARMUP + steps + 1
    if mode == "compile":
        torch._dynamo.reset()  # every Decoder compiles the same step code: do not run into the recompile limit
    decoder = Decoder(model, batch, capacity, mode=mode, sampler=sampler)  # ValueError when the cache does not fit
    prefill_ms = None
    with torch.no_grad():
        if real_prefill or prompt is not None:
            prefill_ms = timed_prefill(decoder, context, prompt)
        else:
            fill_randomly(decoder, context)
        for _ in range(TIMED_WARMUP):
            decoder.step()
    return decoder, prefill_ms


def timed_prefill(decoder: Decoder, context: int, prompt=None) -> float:
    """ms of the decoder's prefill of `prompt` (default: random tokens, `context` per sequence)."""
    device = decoder.device
    if prompt is None:
        prompt = torch.randint(1, decoder.model.config.vocab_size, (decoder.batch_size, context), device=device)
    start = now(device)
    decoder.prefill(prompt)
    return 1e3 * (now(device) - start)


def cold_prefill_ms(model, batch: int, context: int) -> float:
    """Prefill a throwaway cache once and return its ms. The first prefill of a model in the process pays one-time
    costs, Triton's autotuning of SFA's kernels above all (on an H200, SFA's first prefill at B=4, 32k took 14.4 s; in
    another run, where it came after a B=1 row, 2.3 s), so the first real-prefill row of each model runs this first
    and reports it beside its warm prefill."""
    decoder = Decoder(model, batch, context + 1, mode="eager")
    elapsed = timed_prefill(decoder, context)
    device = decoder.device
    del decoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed


def time_steps(decoder: Decoder, steps: int) -> float:
    """Wall-clock ms per decode step over `steps` steps (the device synchronised before and after)."""
    with torch.no_grad():
        start = now(decoder.device)
        for _ in range(steps):
            decoder.step()
        return 1e3 * (now(decoder.device) - start) / steps


def byte_floor_ms(weight_bytes: int, context_bytes: int, copy_gbps: float) -> float:
    """The least time a step can take: the weights and the valid cache read once at the copy bandwidth."""
    return (weight_bytes + context_bytes) / (copy_gbps * 1e6)


def measure_ours(model, batch: int, context: int, steps: int, mode: str, real_prefill: bool, prompt=None) -> dict:
    """One row: prefill (real or random fill), warm-up/capture, then `steps` timed decode steps."""
    device = model.lm_head.weight.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    decoder, prefill_ms = ready_decoder(model, batch, context, steps, mode, real_prefill=real_prefill, prompt=prompt)
    step_ms = time_steps(decoder, steps)
    row = dict(mode=decoder.mode, prefill_ms=prefill_ms, step_ms=step_ms, tokens_per_s=batch / step_ms * 1e3,
               cache_bytes=decoder.cache.nbytes(),
               peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    row["tokens"] = decoder.tokens[:, : context + 1 + TIMED_WARMUP + steps].cpu() if prompt is not None else None
    del decoder
    return row


def measure_hf(model, prompt: torch.Tensor, steps: int) -> dict:
    """transformers' generate with a StaticCache (compiled by generate itself on CUDA) on to_hf(model)."""
    from transformers import StaticCache  # lazy: transformers is optional (the HF peer rows say when it is absent)

    from models.hf import to_hf  # lazy: imports transformers

    device = prompt.device
    hf = to_hf(model)
    n_new = TIMED_WARMUP + steps + 1  # as many tokens as ours produces at this point
    cache = StaticCache(config=hf.config, max_cache_len=prompt.shape[1] + n_new)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                  disable_compile=device.type != "cuda")

    def run(n):
        cache.reset()
        start = now(device)
        out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return out, now(device) - start

    with torch.no_grad():
        out, _ = run(n_new)  # compiles the decoding step, then records its CUDA graphs
        run(n_new)
        full = min(run(n_new)[1] for _ in range(2))
        prefill = min(run(1)[1] for _ in range(2))
    step_ms = 1e3 * (full - prefill) / (n_new - 1)
    del hf, cache
    return dict(mode="hf-static-compiled" if device.type == "cuda" else "hf-static", prefill_ms=1e3 * prefill,
                step_ms=step_ms, tokens_per_s=prompt.shape[0] / step_ms * 1e3, tokens=out.cpu())


def fmt(value, spec=".2f", missing="-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<11} {'attn':<6} {'B':>5} {'ctx':>7} {'mode':<18} {'prefill ms':>10} {'ms/step':>8} "
            f"{'tok/s':>9} {'cache GiB':>9} {'peak GiB':>8} {'floor ms':>8} {'x floor':>7} {'vs dense':>8}  note")
    print(head)
    print("-" * len(head))
    gib = 2**30
    for r in rows:
        print(f"{r['model']:<11} {r['attention']:<6} {r['batch']:>5} {r['context']:>7} {r.get('mode', '-'):<18} "
              f"{fmt(r.get('prefill_ms'), '.1f'):>10} {fmt(r.get('step_ms'), '.3f'):>8} {fmt(r.get('tokens_per_s'), '.0f'):>9} "
              f"{fmt(r['cache_bytes'] / gib if r.get('cache_bytes') else None):>9} "
              f"{fmt(r['peak_memory_bytes'] / gib if r.get('peak_memory_bytes') else None):>8} "
              f"{fmt(r.get('floor_ms'), '.3f'):>8} {fmt(r.get('floor_ratio')):>7} {fmt(r.get('vs_dense')):>8}  {r.get('note', '')}")


def summarize(rows: list[dict]) -> list[str]:
    """The end-to-end targets of docs/design.md, read off the rows."""
    lines = []
    ours = [r for r in rows if r.get("step_ms") and not r["mode"].startswith("hf")]
    for r in ours:
        if r["attention"] == "dense" and r["context"] >= 16384 and r["batch_label"] != "max" and r["batch"] <= 16:
            lines.append(f"dense step / byte floor {r['model']} B={r['batch']} ctx={r['context']} {r['mode']}: "
                         f"{r['floor_ratio']:.2f} (target <= 2)")
    for r in ours:
        if r["attention"] == "sfa" and r["context"] >= 32768 and r["batch"] >= 4 and r.get("vs_dense"):
            lines.append(f"SFA tokens/s vs dense {r['model']} B={r['batch']} ctx={r['context']} {r['mode']}: "
                         f"{r['vs_dense']:.2f}x (target >= 1.3)")
    maxes = {(r["model"], r["context"], r["attention"]): r["batch"] for r in rows if r["batch_label"] == "max"}
    for (model, context, attention), b in maxes.items():
        dense = maxes.get((model, context, "dense"))
        if attention != "dense" and dense:
            lines.append(f"largest batch {attention} / dense {model} ctx={context}: {b} / {dense} = {b / dense:.2f}x "
                         "(target >= 1.6 for sfa)")
    for r in rows:
        if r.get("vs_hf"):
            lines.append(f"ours / HF tokens/s {r['model']} {r['attention']} B={r['batch']} ctx={r['context']}: "
                         f"{r['vs_hf']:.2f}x (target >= 1), same greedy tokens: {r['same_tokens']}")
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args, "bench_generate.py")
    models, attentions = args.models.split(","), args.attentions.split(",")
    batches, contexts = args.batches.split(","), int_list(args.contexts)
    compile_at, hf_at = points(args.compile_at), points(args.hf_at)
    max_len = max([*contexts, *(c for _, c in compile_at + hf_at)]) + TIMED_WARMUP + args.steps + 1
    apply_decode_plan(args.decode_plan)
    env = environment(device, dtype)
    copy_gbps = copy_bandwidth_gbps(device)
    print(json.dumps(env), f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows, began = [], time.perf_counter()

    def record(row):
        rows.append(row)
        print(f"[{time.perf_counter() - began:6.1f}s] {row['model']} {row['attention']} B={row['batch']} "
              f"ctx={row['context']} {row.get('mode', '')}: {fmt(row.get('step_ms'), '.3f')} ms/step {row.get('note', '')}",
              flush=True)

    for preset in models:
        for attention in attentions:
            model = make_model(preset, attention, max_len, args, device, dtype)
            base = dict(model=preset, attention=attention, kv_bytes_per_token=model.kv_cache_bytes_per_token(dtype),
                        weight_bytes=weight_bytes_read(model))
            grid = [(mode, label, context) for mode in args.modes.split(",") for context in contexts for label in batches]
            if preset in args.compile_models.split(",") and attention in args.compile_attentions.split(","):
                grid += [("compile", str(b), c) for b, c in compile_at]
            cold_prefill_done = False
            for mode, label, context in grid:
                capacity = context + TIMED_WARMUP + args.steps + 1
                batch = max_batch(model, capacity, args.max_batch) if label == "max" else int(label)
                row = dict(base, batch=batch, batch_label=label, context=context, mode=mode)
                if batch < 1:
                    record(dict(row, note="no batch fits"))
                    continue
                real_prefill = batch * context <= args.prefill_tokens
                try:
                    if real_prefill and not cold_prefill_done:
                        row["prefill_cold_ms"] = cold_prefill_ms(model, batch, context)
                        cold_prefill_done = True
                    row.update(measure_ours(model, batch, context, args.steps, mode, real_prefill=real_prefill))
                except (ValueError, torch.cuda.OutOfMemoryError) as e:
                    record(dict(row, note="does not fit: " + str(e).splitlines()[0][:100]))
                    continue
                row.pop("tokens")
                if row["prefill_ms"] is None:
                    row["note"] = "cache filled randomly (no prefill)"
                record(row)
            for batch, context in hf_at:
                prompt = torch.randint(1, model.config.vocab_size, (batch, context), device=device)
                ours = dict(base, batch=batch, batch_label=f"hf:{batch}", context=context)
                ours.update(measure_ours(model, batch, context, args.steps, "auto", real_prefill=True, prompt=prompt))
                peer = dict(base, batch=batch, batch_label=f"hf:{batch}", context=context)
                try:
                    peer.update(measure_hf(model, prompt, args.steps))
                except Exception as e:  # short has no HF equivalent; anything HF cannot compile or run is reported
                    record(dict(peer, mode="hf", note="HF cannot run it: " + str(e).splitlines()[0][:100]))
                    ours.pop("tokens")
                    record(ours)
                    continue
                same = torch.equal(ours.pop("tokens"), peer.pop("tokens"))
                ours.update(vs_hf=ours["tokens_per_s"] / peer["tokens_per_s"], same_tokens=same)
                if attention == "sfa":
                    peer["note"] = "HF caches SFA's keys dense"
                record(peer)
                record(ours)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    dense_rate = {(r["model"], r["batch"], r["context"], r["mode"]): r["tokens_per_s"]
                  for r in rows if r["attention"] == "dense" and r.get("step_ms") and not r["mode"].startswith("hf")}
    for r in rows:
        if not r.get("step_ms"):
            continue
        context_bytes = r["batch"] * r["context"] * r["kv_bytes_per_token"]
        r["floor_ms"] = byte_floor_ms(r["weight_bytes"], context_bytes, copy_gbps)
        r["floor_ratio"] = r["step_ms"] / r["floor_ms"]
        dense = dense_rate.get((r["model"], r["batch"], r["context"], r["mode"]))
        if dense and r["attention"] != "dense" and not r["mode"].startswith("hf"):
            r["vs_dense"] = r["tokens_per_s"] / dense
    print()
    print_table(rows)
    summary = summarize(rows)
    print("\n" + "\n".join(summary))
    result = dict(env=env, copy_gbps=copy_gbps, args=vars(args), summary=summary, rows=rows,
                  seconds=time.perf_counter() - began)
    write_results(result, args.out, "generate.json")
    return result


if __name__ == "__main__":
    main()
