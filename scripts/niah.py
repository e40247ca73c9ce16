"""Synthetic needle in a haystack: make training data, or evaluate a checkpoint.

    # training data for train.py (token shards + meta.json), windows of seq_len + 1 tokens; the loss is on
    # the answer only (a per-token loss mask beside each shard) unless --loss-on all
    python scripts/niah.py make-data --out workspace/data/niah-8k-gpt2 --seq-len 8192 --train-samples 20000
    # exact-match accuracy per (length, depth): a JSON file and a heatmap PNG
    python scripts/niah.py eval --checkpoint workspace/runs/RUN --lengths 1024,2048,4096,8184 \
        --depths 0,0.25,0.5,0.75,1 --samples 20
    # the same prompts with SFA switched on a dense checkpoint, or with real text around the needle
    python scripts/niah.py eval --checkpoint DENSE_RUN --attention sfa --k 8
    python scripts/niah.py eval --checkpoint RUN --haystack-data workspace/data/embedded-gpt2
    # accuracy vs length of several evaluated runs (depths pooled): a table and a JSON file
    python scripts/niah.py summarize --out summary.json RUN_A/eval/niah-step_X RUN_B/eval/niah-step_Y

Defaults follow the paper's setting: a haystack of one repeated filler character (--filler '.'),
"The secret number is NNNNN." as the needle, greedy decoding, exact match of the digits. Everything is
seeded (--seed): the same arguments give the same prompts. Protocol: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.sinks import read_metrics  # noqa: E402  (plain or gzipped metrics.jsonl; no torch)

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def depth_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must be numbers in [0, 1], got {text!r}")
    return values


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt (keep these equal between make-data and eval)")
    g.add_argument("--filler", default=".", help="haystack: this string repeated (default '.')")
    g.add_argument("--haystack-data", help="haystack: real text from this prepared data directory instead of the filler")
    g.add_argument("--haystack-split", help="split of --haystack-data (default: train for make-data, val for eval)")
    g.add_argument("--needle", default=" The secret number is {answer}.", help="needle text; {answer} = the digits")
    g.add_argument("--question", default=" What is the secret number? The secret number is", help="text after the haystack")
    g.add_argument("--answer", default=" {answer}", help="what the model should generate; {answer} = the digits")
    g.add_argument("--digits", type=int, default=5, help="digits of the secret number (default 5)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    make = sub.add_parser("make-data", help="write NIAH training data (token shards + meta.json)")
    make.add_argument("--out", required=True, help="output data directory")
    make.add_argument("--tokenizer", default="gpt2", help="gpt2 | qwen (default gpt2)")
    make.add_argument("--seq-len", type=int, required=True, help="train.seq_len of the run that will train on it")
    make.add_argument("--lengths", type=int_list, help="prompt lengths to draw from (default: the longest that fits)")
    make.add_argument("--train-samples", type=int, default=10_000, help="training prompts (default 10000)")
    make.add_argument("--val-samples", type=int, default=200, help="validation prompts (default 200)")
    make.add_argument("--loss-on", choices=("answer", "all"), default="answer",
                      help="tokens the training loss covers: answer (default; a loss mask on the answer and the eot "
                           "after it) | all (no mask)")
    make.add_argument("--one-per-window", action="store_true",
                      help="one sample per training window (eot padding after it) instead of packing several, so that "
                           "no earlier sample's needle is in view")
    make.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_prompt_args(make)

    ev = sub.add_parser("eval", help="exact-match accuracy of a checkpoint per (length, depth)")
    ev.add_argument("--checkpoint", required=True, help="a step_*.pt file or a run directory")
    ev.add_argument("--lengths", type=int_list, help="prompt lengths in tokens (default: the model's max_seq_len minus room to answer)")
    ev.add_argument("--depths", type=depth_list, default=depth_list(DEFAULT_DEPTHS), help=f"needle depths (default {DEFAULT_DEPTHS})")
    ev.add_argument("--samples", type=int, default=10, help="prompts per (length, depth) (default 10)")
    ev.add_argument("--tokenizer", help="gpt2 | qwen (default: the run's)")
    ev.add_argument("--attention", choices=("sfa", "dense"), help="evaluate with this attention instead of the trained one")
    ev.add_argument("--k", type=int, help="features kept per query/key row with --attention sfa")
    ev.add_argument("--backend", default="auto", help="SFA backend with --attention sfa (default auto)")
    ev.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    ev.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    ev.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on cuda, fp32 on cpu")
    ev.add_argument("--out", help="output folder for niah.json and niah.png (default: <run dir>/eval/niah-...)")
    add_prompt_args(ev)

    summ = sub.add_parser("summarize", help="accuracy vs length of several evaluated runs: a table and a JSON file")
    summ.add_argument("evals", nargs="+", help="niah.json files written by `eval` (or their folders)")
    summ.add_argument("--out", required=True, help="the summary JSON file to write")
    return parser


def prompt_pieces(args, tokenizer, default_split: str):
    from evaluation.niah import FillerHaystack, NeedleFormat, haystack_from_prepared  # lazy: see make_data

    fmt = NeedleFormat(needle=args.needle, question=args.question, answer=args.answer, digits=args.digits)
    if args.haystack_data:
        haystack = haystack_from_prepared(args.haystack_data, args.haystack_split or default_split, tokenizer)
    else:
        haystack = FillerHaystack(tokenizer, args.filler)
    return fmt, haystack


def make_data(args) -> dict:
    # lazy: the subcommands need different modules (make-data runs without torch) and --help none
    from data.tokenizers import get_tokenizer
    from evaluation.niah_data import max_answer_tokens, write_training_data

    tokenizer = get_tokenizer(args.tokenizer)
    fmt, haystack = prompt_pieces(args, tokenizer, "train")
    lengths = args.lengths or [args.seq_len - max_answer_tokens(fmt)]
    out = write_training_data(
        args.out, tokenizer, haystack, fmt, seq_len=args.seq_len, lengths=lengths, train_count=args.train_samples,
        val_count=args.val_samples, seed=args.seed, loss_on=args.loss_on, one_per_window=args.one_per_window,
        overwrite=args.overwrite,
    )  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    for split, info in meta["splits"].items():
        print(f"{split:<5}  {info['documents']:>7} samples  {info['windows']:>7} windows  {info['tokens']:>11,} tokens")
    print(f"wrote {out}  (train on it with train.seq_len={args.seq_len})")
    return meta


def run_dir_of(checkpoint_file: Path) -> Path:
    return checkpoint_file.parent.parent if checkpoint_file.parent.name == "checkpoints" else checkpoint_file.parent


def default_out(checkpoint_file: Path, override: dict | None) -> Path:
    run_dir = run_dir_of(checkpoint_file)
    tag = "" if override is None else f"-{override['kind']}" + (f"-k{override['topk_q']}" if "topk_q" in override else "")
    return run_dir / "eval" / f"niah-{checkpoint_file.stem}{tag}"


def evaluate(args) -> dict:
    # lazy: torch is heavy; make-data, summarize and --help run without it
    import torch
    from tqdm import tqdm

    from data.tokenizers import get_tokenizer
    from evaluation.checkpoint import attention_override, load_model
    from evaluation.niah import eval_samples
    from evaluation.niah_data import max_answer_tokens
    from evaluation.niah_score import answer_budget, model_generate_fn, plot_heatmap, score_samples
    from evaluation.runtime import autocast, resolve_dtype
    from training.checkpoint import read_checkpoint
    from training.distributed import resolve_device
    from training.run_config import run_tokenizer

    device = resolve_device(args.device, key="--device")
    dtype = resolve_dtype(args.dtype, device)
    override = attention_override(args.attention, args.k, args.backend)
    _, cfg, checkpoint_file = read_checkpoint(args.checkpoint)
    tokenizer_name = args.tokenizer or run_tokenizer(cfg)
    if tokenizer_name is None:
        raise SystemExit("niah eval: the checkpoint's config names no tokenizer; pass --tokenizer")
    tokenizer = get_tokenizer(tokenizer_name)
    model, _ = load_model(checkpoint_file, device, attention=override)
    fmt, haystack = prompt_pieces(args, tokenizer, "val")
    max_len = model.config.max_seq_len
    # room for the leading eot, the answer and one more token
    lengths = args.lengths or [max_len - max_answer_tokens(fmt) - 2]
    samples = eval_samples(tokenizer, haystack, fmt, lengths, args.depths, args.samples, args.seed)
    needed = 1 + max(lengths) + answer_budget(samples)
    if needed > max_len:
        raise SystemExit(
            f"niah eval: the longest prompt ({max(lengths)} tokens) after the leading end-of-text token, plus "
            f"{answer_budget(samples)} generated tokens, exceeds the model's max_seq_len={max_len}; use shorter --lengths"
        )
    generate = model_generate_fn(model)

    def generate_fn(prompts, n_new):
        # A prompt is fed as a document: after an end-of-text token, as every document of the training data
        # starts (data/format.py, NIAH make-data included). Without it a model trained on such data sees an
        # unfamiliar first position and, in our CPU check, answered in the wrong format.
        start = torch.full((prompts.shape[0], 1), tokenizer.eot_token, dtype=prompts.dtype, device=prompts.device)
        with autocast(device, dtype):
            return generate(torch.cat([start, prompts], dim=1), n_new)

    with torch.no_grad(), tqdm(total=len(samples), desc="niah", unit="prompt", disable=None) as bar:
        result = score_samples(samples, generate_fn, tokenizer, batch_size=args.batch_size, device=device, progress=bar.update)
    out = Path(args.out) if args.out else default_out(checkpoint_file, override)
    out.mkdir(parents=True, exist_ok=True)
    attention = {f: getattr(model.attention, f) for f in ("kind", "topk_q", "topk_k", "backend")}
    report = {
        "checkpoint": str(checkpoint_file),
        "attention": attention,
        "attention_override": override is not None,
        "tokenizer": tokenizer.name,
        "haystack": haystack.description,
        "needle": fmt.needle, "question": fmt.question, "answer": fmt.answer, "digits": fmt.digits,
        "prompt_prefix": "eot", "lengths": lengths, "depths": args.depths, "samples_per_cell": args.samples, "seed": args.seed,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result,
    }  # fmt: skip
    (out / "niah.json").write_text(json.dumps(report, indent=2) + "\n")
    label = attention["kind"] + (f" k={attention['topk_q']}" if attention["kind"] == "sfa" else "")
    plot_heatmap(result["cells"], out / "niah.png", title=f"NIAH exact match\n{run_dir_of(checkpoint_file).name} ({label})")
    print_summary(result["cells"], lengths, args.depths)
    print(f"overall exact match {result['accuracy']:.1%} over {len(samples)} prompts; wrote {out}/niah.json and niah.png")
    return report


def print_summary(cells, lengths, depths) -> None:
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    print("depth \\ length " + "".join(f"{n:>9}" for n in lengths))
    for d in depths:
        print(f"{d:>14.2f} " + "".join(f"{acc[(n, d)]:>9.0%}" for n in lengths))


def run_record(niah_json: Path) -> dict:
    """One row of the study: what was trained (config.yaml, metrics.jsonl of the run) and its accuracy per length."""
    report = json.loads(niah_json.read_text())
    run_dir = run_dir_of(Path(report["checkpoint"]))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = read_metrics(run_dir)
    last = metrics[-1] if metrics else {}
    attention = report["attention"]
    label = attention["kind"] + (f" k={attention['topk_q']}" if attention["kind"] == "sfa" else "")
    by_length = {}
    for cell in report["cells"]:
        entry = by_length.setdefault(cell["length"], {"correct": 0, "samples": 0})
        entry["correct"] += cell["correct"]
        entry["samples"] += cell["samples"]
    for entry in by_length.values():
        entry["accuracy"] = entry["correct"] / entry["samples"]
    return {
        "label": label, "attention": attention, "model": config["model"]["preset"],
        "train_seq_len": config["train"]["seq_len"], "steps": last.get("step"), "tokens": last.get("tokens"),
        "train_seconds": last.get("elapsed_s"), "final_loss": last.get("loss"),
        "val_loss": next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None),
        "accuracy": report["accuracy"], "by_length": {str(n): by_length[n] for n in sorted(by_length)},
        "depths": report["depths"], "samples_per_cell": report["samples_per_cell"], "niah_json": str(niah_json),
        "run_dir": str(run_dir), "device": report["device"],
    }  # fmt: skip


def summarize(args) -> dict:
    files = [Path(e) / "niah.json" if Path(e).is_dir() else Path(e) for e in args.evals]
    for f in files:
        if not f.is_file():
            raise SystemExit(f"niah summarize: {f} does not exist (run `scripts/niah.py eval` first)")
    rows = [run_record(f) for f in files]
    lengths = sorted({int(n) for r in rows for n in r["by_length"]})
    header = f"{'model':<10}{'train ctx':>10}{'steps':>7}{'val loss':>9}" + "".join(f"{n:>8}" for n in lengths) + f"{'all':>8}"
    print("NIAH exact match by prompt length (all depths pooled)")
    print(header)
    for r in rows:
        cells = "".join(
            f"{r['by_length'][str(n)]['accuracy']:>8.0%}" if str(n) in r["by_length"] else f"{'-':>8}" for n in lengths
        )
        val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
        print(f"{r['label']:<10}{r['train_seq_len']:>10}{r['steps'] or 0:>7}{val:>9}{cells}{r['accuracy']:>8.0%}")
    summary = {"lengths": lengths, "runs": rows, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return {"make-data": make_data, "eval": evaluate, "summarize": summarize}[args.command](args)


if __name__ == "__main__":
    main()
