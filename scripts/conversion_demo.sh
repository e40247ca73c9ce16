#!/usr/bin/env bash
# Dense -> SFA conversion on a CPU, end to end (docs/conversion.md):
#   1. pretrain a small dense GPT-2 on the embedded corpus;
#   2. val loss of (a) that dense model, (b) the same weights with SFA k=8 switched on, no training;
#   3. fine-tune the dense weights as SFA k=8 for the same steps with (c) λ=0 (LM loss only) and
#      (d) each λ>0 in LAMBDAS (LM loss + Eq. 8 output matching), and evaluate all on the same val windows;
#   4. the control for "more training": (e) the dense model fine-tuned the same steps, dense.
# Prints a table and writes the results JSON (default docs/results/conversion_cpu.json).
#
#   scripts/conversion_demo.sh                       # everything, ~10-15 min on a 2-core CPU
#   PRETRAIN_STEPS=60 FINETUNE_STEPS=20 scripts/conversion_demo.sh   # a quicker look
#   GPU=1 OUT_JSON=conversion_gpu.json scripts/conversion_demo.sh    # GPU scale: the quality study's 6-layer
#                                                                     # GPT-2, seq 512, 32k tokens/step
# Stages whose run already reached its steps are skipped (train.py resumes; nothing left to do).
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${ROOT:-workspace/conversion_demo}       # runs go to $ROOT/runs/<name>
DATA_ROOT=${DATA_ROOT:-workspace/data}        # the prepared embedded corpus is shared with other runs
OUT_JSON=${OUT_JSON:-docs/results/conversion_cpu.json}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-250}
FINETUNE_STEPS=${FINETUNE_STEPS:-60}
K=${K:-8}
LAMBDAS=${LAMBDAS:-1.0 100.0}                 # λ of the (d) arms
EVAL_BATCHES=${EVAL_BATCHES:-}                # batches of 8 val windows, the same for every model (CPU 40, GPU all)

if [[ "${GPU:-0}" == 1 ]]; then
    # The GPT-2 arm of the quality study (configs/experiment/study_gpt2.yaml): 6 layers, 6 heads of 64, seq 512.
    MODEL=(model=gpt2_tiny model.n_layer=6 model.n_head=6 model.d_model=384 model.head_dim=64 train.seq_len=512
           train.batch_tokens=32768 train.micro_batch=64 train.eval_batches=16)
    MODEL_DESC="gpt2_tiny with n_layer=6 d_model=384 n_head=6 (head dim 64), seq 512, 32768 tokens/step, bf16 autocast"
    DEVICE=cuda
    EVAL_BATCHES=${EVAL_BATCHES:-all}
else
    # A 2-layer GPT-2 with two 64-wide heads (k=8 of 64, as in the paper), 128-token sequences, 1k tokens/step.
    MODEL=(model=gpt2_tiny model.n_layer=2 model.d_model=128 model.n_head=2 train.seq_len=128
           train.batch_tokens=1024 train.micro_batch=8)
    MODEL_DESC="gpt2_tiny with n_layer=2 d_model=128 n_head=2 (head dim 64), seq 128, 1024 tokens/step"
    DEVICE=cpu
    EVAL_BATCHES=${EVAL_BATCHES:-40}
fi
MODEL+=(logging=disabled "root=$ROOT" "data.root=$DATA_ROOT")
export CONVERSION_MODEL_DESC=$MODEL_DESC
FINETUNE=("init.from_checkpoint=$ROOT/runs/dense-pretrain" train.max_steps=$FINETUNE_STEPS train.eval_every=0 train.ckpt_every=0 train.log_every=10
          optim.lr=5e-4 optim.min_lr=5e-5 optim.warmup_steps=5)

start=$(date +%s)
python train.py "${MODEL[@]}" run_name=dense-pretrain attention=dense train.max_steps=$PRETRAIN_STEPS \
    train.eval_every=$(( (PRETRAIN_STEPS + 1) / 2 )) train.ckpt_every=$(( (PRETRAIN_STEPS + 1) / 2 )) train.log_every=25 \
    optim.warmup_steps=20
python train.py "${MODEL[@]}" "${FINETUNE[@]}" run_name=sfa-k$K-lambda0 attention=sfa attention.k=$K convert.match_weight=0
for lam in $LAMBDAS; do
    python train.py "${MODEL[@]}" "${FINETUNE[@]}" run_name=sfa-k$K-lambda$lam attention=sfa attention.k=$K convert=eq8 convert.match_weight=$lam
done
python train.py "${MODEL[@]}" "${FINETUNE[@]}" run_name=dense-finetuned attention=dense

EVAL_DIR=$ROOT/eval
mkdir -p "$EVAL_DIR"
evaluate() {  # name, run dir, extra eval_ppl args; skipped when its JSON is newer than the run's checkpoint
    newest=$(ls -t "$2"/checkpoints/step_*.pt | head -1)
    if [[ -f "$EVAL_DIR/$1.json" && "$EVAL_DIR/$1.json" -nt "$newest" ]]; then echo "$1: up to date"; return; fi
    python scripts/eval_ppl.py --checkpoint "$2" --batches "$EVAL_BATCHES" --device "$DEVICE" --out "$EVAL_DIR/$1.json" "${@:3}"
}
evaluate a_dense "$ROOT/runs/dense-pretrain"
evaluate b_sfa_no_training "$ROOT/runs/dense-pretrain" --attention sfa --k "$K"
evaluate c_finetuned_lambda0 "$ROOT/runs/sfa-k$K-lambda0"
for lam in $LAMBDAS; do
    evaluate d_finetuned_lambda$lam "$ROOT/runs/sfa-k$K-lambda$lam"
done
evaluate e_dense_finetuned "$ROOT/runs/dense-finetuned"
wall=$(( $(date +%s) - start ))

python - "$EVAL_DIR" "$OUT_JSON" "$wall" "$PRETRAIN_STEPS" "$FINETUNE_STEPS" "$K" "$LAMBDAS" <<'EOF'
import json, os, platform, sys
from datetime import datetime, timezone
from pathlib import Path

eval_dir, out, wall, pre, ft, k, lambdas = sys.argv[1:]


def machine() -> str:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast"
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), fp32"

rows = []
labels = {
    "a_dense": "(a) dense, pretrained",
    "b_sfa_no_training": f"(b) SFA k={k}, switched on without training",
    "c_finetuned_lambda0": f"(c) SFA k={k}, fine-tuned {ft} steps, λ=0",
    **{f"d_finetuned_lambda{lam}": f"(d) SFA k={k}, fine-tuned {ft} steps, λ={lam}" for lam in lambdas.split()},
    "e_dense_finetuned": f"(e) control: dense, fine-tuned {ft} steps",
}
for name, label in labels.items():
    r = json.loads((Path(eval_dir) / f"{name}.json").read_text())
    metrics = Path(r["checkpoint"]).parent.parent / "metrics.jsonl"
    last = json.loads(metrics.read_text().splitlines()[-1])
    rows.append({"arm": name, "label": label, "val_loss": r["loss"], "val_perplexity": r["perplexity"],
                 "val_tokens": r["tokens"], "checkpoint": r["checkpoint"], "attention": r["attention"],
                 "last_train_record": {k2: last.get(k2) for k2 in ("step", "loss", "lm_loss", "match_loss", "elapsed_s")}})
result = {
    "what": "dense -> SFA conversion fine-tuning (paper Eq. 8) on the embedded corpus, scripts/conversion_demo.sh",
    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    "machine": machine(),
    "wall_seconds_this_invocation": int(wall),  # stages already done are skipped; see each run's elapsed_s
    "model": os.environ["CONVERSION_MODEL_DESC"],
    "pretrain_steps": int(pre), "finetune_steps": int(ft), "k": int(k), "match_weights": [float(x) for x in lambdas.split()],
    "eval": "scripts/eval_ppl.py, the first val windows of the embedded corpus, identical for every arm",
    "pretrain_elapsed_s": json.loads((Path(sys.argv[1]).parent / "runs" / "dense-pretrain" / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"],
    "arms": rows,
}
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(f"\n{'arm':<52} {'val loss':>9} {'val ppl':>9}")
for r in rows:
    print(f"{r['label']:<52} {r['val_loss']:>9.4f} {r['val_perplexity']:>9.2f}")
print(f"\nwall {wall} s; JSON: {out}")
EOF
