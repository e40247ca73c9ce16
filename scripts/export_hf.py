"""Export a training checkpoint as a Hugging Face transformers model directory (save_pretrained).

    python scripts/export_hf.py workspace/runs/<run> workspace/hf/<run>          # newest checkpoint of the run
    python scripts/export_hf.py RUN/checkpoints/step_00000500.pt OUT --attention sfa --k 8

The first argument is a run directory or a step_*.pt file. The output loads with
`transformers.AutoModelForCausalLM.from_pretrained(OUT)`; an SFA model's config.json asks for
attn_implementation "sfa" (and holds its k), so load it after `import models.hf`, which registers
"sfa" with transformers; without that import transformers refuses the directory rather than run it
dense. Not exportable (refused with the reason): the short-embedding baseline and Qwen3's feature map
(HF has no place for their weights), GPT-2 shapes with d_model != n_head * head_dim.
The tokenizer is not written: GPT-2 runs use tiktoken's GPT-2 BPE, the same as HF's "gpt2" tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> Path:
    # lazy: torch and transformers are heavy; --help answers without them
    from evaluation.checkpoint import attention_override, load_model
    from models.hf import to_hf
    from training.checkpoint import find_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a step_*.pt file")
    p.add_argument("out", type=Path, help="the directory to write (config.json + model.safetensors)")
    p.add_argument("--attention", choices=("sfa", "dense"), help="export with this attention instead of the trained one")
    p.add_argument("--k", type=int, help="features kept per query/key row with --attention sfa")
    args = p.parse_args(argv)
    try:
        file = find_checkpoint(args.checkpoint)
        model, _ = load_model(file, "cpu", attention_override(args.attention, args.k))
        hf_model = to_hf(model)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"export_hf: {e}\n")
    hf_model.save_pretrained(args.out)
    att = model.attention
    running = f"SFA k_q={att.topk_q} k_k={att.topk_k}" if att.kind == "sfa" else att.kind
    print(f"exported {file} ({running}) to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
