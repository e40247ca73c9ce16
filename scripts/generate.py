"""Generate text from a training run, a checkpoint or an HF model directory; prints the text and tokens/s.

    python scripts/generate.py workspace/runs/<run> --prompt "ROMEO:" --max-new-tokens 200
    python scripts/generate.py RUN/checkpoints/step_00001000.pt --prompt-file prompt.txt --attention sfa --k 8
    python scripts/generate.py path/to/hf_dir --prompt "Once upon a time" --num-samples 4 --seed 1 --top-k 50

The first argument is a run directory (its newest checkpoint), a step_*.pt file, or a save_pretrained
directory of a GPT-2 or Qwen3 model (config.json inside). --attention sfa --k K (or dense) runs another
attention on the same weights. The tokenizer is the run's (data.tokenizer), an HF directory's own, or by model
type (gpt2 / qwen); --tokenizer overrides. Generation stops at the tokenizer's end-of-text token unless
--ignore-eos. The samples go to stdout; timings (prefill, ms per decode step, tokens/s) to stderr.
Decoding runs the static-cache engine of models/decoding.py (docs/inference.md); --mode picks how its step
runs (auto: CUDA graphs on a GPU, eager on CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run directory, a step_*.pt checkpoint, or an HF save_pretrained directory")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="a file holding the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the same prompt, decoded as one batch")
    p.add_argument("--attention", choices=("sfa", "dense"), help="run this attention instead of the trained one")
    p.add_argument("--k", type=int, help="features kept per query/key row with --attention sfa")
    p.add_argument("--backend", default="auto", help="SFA backend with --attention sfa (default: auto)")
    p.add_argument("--tokenizer", help="tokenizer name (gpt2 | qwen) instead of the model's")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="weights and cache (auto: bf16 on cuda)")
    p.add_argument("--mode", default="auto", choices=("auto", "eager", "graph", "compile"),
                   help="how the decode step runs (auto: graph on CUDA; compile: 1.1-1.4x faster steps after about a "
                        "minute of compiling, worth it for long generations; docs/inference.md)")
    p.add_argument("--prefill-chunk", type=int, help="prompt positions per prefill forward (default: ~16k tokens)")
    p.add_argument("--seed", type=int, default=1337)
    return p


class HFTokenizer:
    """An HF directory's own tokenizer, with the interface of data.tokenizers'."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer  # lazy: transformers is heavy and only HF directories need it

        self.hf = AutoTokenizer.from_pretrained(directory)
        self.name, self.eot_token = str(directory), self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


def load_source(source: str, attention: dict | None, tokenizer_name: str | None):
    """(model on CPU, tokenizer) for a run directory, a checkpoint file or an HF directory."""
    from data.tokenizers import get_tokenizer  # lazy: torch-heavy; --help and bad arguments answer without it
    from models.gpt2 import GPT2Config  # lazy: as above

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source} does not exist; give a run directory, a step_*.pt checkpoint or an HF "
                                "model directory (with config.json)")
    if path.is_dir() and (path / "config.json").is_file():
        from models.hf import from_hf  # lazy: imports transformers (heavy, optional)

        model = from_hf(path, attention=attention)
        if tokenizer_name is None and any((path / f).is_file() for f in HF_TOKENIZER_FILES):
            return model, HFTokenizer(path)
        default = "gpt2" if isinstance(model.config, GPT2Config) else "qwen"
        return model, get_tokenizer(tokenizer_name or default)
    from evaluation.checkpoint import load_model  # lazy: torch-heavy; --help answers without it
    from training.run_config import run_tokenizer  # lazy: as above

    model, cfg = load_model(path, "cpu", attention)
    return model, get_tokenizer(tokenizer_name or run_tokenizer(cfg) or "gpt2")


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if not args.prompt_file.is_file():
        raise FileNotFoundError(f"--prompt-file {args.prompt_file} does not exist")
    return args.prompt_file.read_text()


def prompt_ids(tokenizer, text: str, model, max_new_tokens: int) -> list[int]:
    ids = tokenizer.encode(text)
    vocab, max_len = model.config.vocab_size, model.config.max_seq_len
    if not ids:
        raise ValueError("the prompt is empty (it encodes to no tokens)")
    if max(ids) >= vocab:
        raise ValueError(f"tokenizer {tokenizer.name} gives id {max(ids)}, outside the model's vocab_size={vocab}; "
                         "pass the model's --tokenizer")
    if len(ids) > max_len:
        raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's max_seq_len={max_len}; shorten it")
    if len(ids) + max_new_tokens > max_len:
        raise ValueError(f"the prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceed the model's "
                         f"max_seq_len={max_len}; use --max-new-tokens {max_len - len(ids)} or less")
    return ids


def describe(model, source: str) -> str:
    att = model.attention
    kind = f"sfa k={att.topk_q}" if att.kind == "sfa" else f"short d={att.d_short}" if att.kind == "short" else att.kind
    cfg = model.config
    return f"{Path(source).name}: {type(model).__name__} {cfg.n_layer}L x {cfg.d_model}d, {kind}"


def main(argv: list[str] | None = None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch  # lazy: torch is heavy; --help and bad arguments answer without it

    from evaluation.checkpoint import attention_override  # lazy: as above (torch)
    from evaluation.runtime import resolve_dtype  # lazy: as above
    from models.decoding import Decoder, cache_bytes  # lazy: as above
    from models.sampling import Sampler  # lazy: as above
    from training.distributed import resolve_device  # lazy: as above

    try:
        if args.max_new_tokens < 1 or args.num_samples < 1:
            raise ValueError("--max-new-tokens and --num-samples must be at least 1")
        device = resolve_device(args.device, key="--device")
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer = load_source(args.source, attention_override(args.attention, args.k, args.backend),
                                       args.tokenizer)
        model = model.to(device=device, dtype=dtype).eval()
        ids = prompt_ids(tokenizer, read_prompt(args), model, args.max_new_tokens)
        torch.manual_seed(args.seed)
        # torch.compile does not trace a Generator: compiled sampling draws from the seeded default one.
        generator = None if args.mode == "compile" else torch.Generator(device=device).manual_seed(args.seed)
        sampler = Sampler(args.temperature, args.top_p, args.top_k, generator)
        prompts = torch.tensor([ids] * args.num_samples, device=device)
        eos = None if args.ignore_eos else tokenizer.eot_token
        decoder = Decoder(model, args.num_samples, len(ids) + args.max_new_tokens, sampler=sampler, mode=args.mode,
                          eos_token_id=eos)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"generate.py: {e}\n")

    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    with torch.no_grad():
        start = now()
        decoder.prefill(prompts, args.prefill_chunk)
        prefilled = now()
        tokens = decoder.decode(args.max_new_tokens)
        done = now()
    texts = [tokenizer.decode(row) for row in tokens.tolist()]
    for text in texts:
        print(text)
        print("---------------")
    steps = tokens.shape[1] - len(ids) - 1
    decode_s = done - prefilled
    rate = f"{args.num_samples * steps / decode_s:.1f} tokens/s" if steps else "no decode steps"
    per_step = f"{1e3 * decode_s / steps:.2f} ms/step" if steps else ""
    cache = cache_bytes(model, args.num_samples, decoder.capacity) / 2**20
    print(
        f"{describe(model, args.source)}, {dtype}, {device}, mode {decoder.mode}: prefill {len(ids)} tokens x "
        f"{args.num_samples} in {1e3 * (prefilled - start):.1f} ms; {steps} decode steps in {decode_s:.3f} s "
        f"{per_step} (first steps warm up and capture); {rate}; KV cache {cache:.1f} MiB",
        file=sys.stderr,
    )
    return texts


if __name__ == "__main__":
    main()
