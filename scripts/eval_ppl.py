"""Loss and perplexity of a checkpoint on a prepared split; prints a table and writes JSON.

    python scripts/eval_ppl.py --checkpoint workspace/runs/gpt2_small-sfa-q8k8-HASH              # the run's own val split
    python scripts/eval_ppl.py --checkpoint RUN --data workspace/data/hf-openwebtext-gpt2 --split val --batches 200
    python scripts/eval_ppl.py --checkpoint DENSE_RUN --attention sfa --k 8                # SFA switched on, no training

--checkpoint takes a step_*.pt file or a run directory (its newest checkpoint). --data defaults to the
data directory the run trained on; --seq-len to the run's train.seq_len. --batches all (default) reads
one full pass over the split. Protocol: docs/evaluation.md "Perplexity".
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_batches(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--batches must be a positive integer or 'all', got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_*.pt file or a run directory")
    p.add_argument("--data", help="prepared data directory (default: the one the run trained on)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--seq-len", type=int, help="tokens of context per window (default: the run's train.seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--batches", type=parse_batches, default=None, help="number of batches, or 'all' (default)")
    p.add_argument("--attention", choices=("sfa", "dense"), help="evaluate with this attention instead of the trained one")
    p.add_argument("--k", type=int, help="features kept per query/key row with --attention sfa")
    p.add_argument("--backend", default="auto", help="SFA backend with --attention sfa (default: auto)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on cuda, fp32 on cpu")
    p.add_argument("--out", help="JSON file to write (default: <run dir>/eval/ppl-<split>[-<attention>].json)")
    return p


def default_out(checkpoint_file: Path, split: str, override: dict | None) -> Path:
    run_dir = checkpoint_file.parent.parent if checkpoint_file.parent.name == "checkpoints" else checkpoint_file.parent
    tag = "" if override is None else f"-{override['kind']}" + (f"-k{override['topk_q']}" if "topk_q" in override else "")
    return run_dir / "eval" / f"ppl-{checkpoint_file.stem}-{split}{tag}.json"


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # lazy: torch is heavy; --help and bad arguments answer without it
    from tqdm import tqdm

    from data.format import read_meta
    from evaluation.checkpoint import attention_override, load_model
    from evaluation.perplexity import evaluate_loss
    from evaluation.runtime import resolve_dtype
    from training.checkpoint import read_checkpoint
    from training.distributed import resolve_device
    from training.run_config import run_data_dir, run_tokenizer

    device = resolve_device(args.device, key="--device")
    dtype = resolve_dtype(args.dtype, device)
    override = attention_override(args.attention, args.k, args.backend)
    _, cfg, checkpoint_file = read_checkpoint(args.checkpoint)
    data_dir = Path(args.data) if args.data else run_data_dir(cfg)
    if data_dir is None:
        raise SystemExit("eval_ppl: the checkpoint's config names no data directory; pass --data")
    meta = read_meta(data_dir)
    trained_with = run_tokenizer(cfg)
    if trained_with is not None and meta["tokenizer"] != trained_with:
        raise SystemExit(
            f"eval_ppl: {data_dir} was tokenized with {meta['tokenizer']!r} but the model was trained with {trained_with!r}; "
            "prepare the data with the model's tokenizer"
        )
    seq_len = args.seq_len or (cfg.get("train") or {}).get("seq_len")
    if seq_len is None:
        raise SystemExit("eval_ppl: the checkpoint's config has no train.seq_len; pass --seq-len")
    model, _ = load_model(checkpoint_file, device, attention=override)
    with tqdm(unit="tok", unit_scale=True, desc="eval", disable=None) as bar:
        result = evaluate_loss(
            model, data_dir, args.split, seq_len=seq_len, batch_size=args.batch_size, max_batches=args.batches,
            device=device, dtype=dtype, progress=bar.update,
        )  # fmt: skip
    report = {
        "checkpoint": str(checkpoint_file),
        "data": str(data_dir),
        "split": args.split,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "attention": {f: getattr(model.attention, f) for f in ("kind", "topk_q", "topk_k", "d_short", "backend")},
        "attention_override": override is not None,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result,
    }
    out = Path(args.out) if args.out else default_out(checkpoint_file, args.split, override)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    att = report["attention"]
    print_table([
        ("checkpoint", report["checkpoint"]),
        ("attention", att["kind"] + (f" k={att['topk_q']}" if att["kind"] == "sfa" else "") + (" (override)" if override else "")),
        ("data / split", f"{data_dir} / {args.split}"),
        ("tokens", f"{result['tokens']:,} of {result['split_tokens']:,} in {result['batches']} batches of {args.batch_size}x{seq_len}"),
        ("loss", f"{result['loss']:.4f}"),
        ("perplexity", f"{result['perplexity']:.3f}"),
        ("tokens/s", f"{result['tokens_per_s']:,.0f} on {device} ({report['dtype']})"),
        ("json", str(out)),
    ])  # fmt: skip
    return report


if __name__ == "__main__":
    main()
