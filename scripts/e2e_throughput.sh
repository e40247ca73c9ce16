#!/usr/bin/env bash
# End-to-end GPT-2 small training throughput at long context: dense (cuDNN SDPA) vs SFA k=8 through each GPU
# backend, same GPU, same config, one after another; then a table + JSON (scripts/summarize_throughput.py).
#   scripts/e2e_throughput.sh [OUT_DIR] [SEQ_LEN] [SECONDS_PER_RUN]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workspace/e2e_throughput}
SEQ_LEN=${2:-8192}
SECONDS_PER_RUN=${3:-40}
mkdir -p "$OUT"
COMMON=(model=gpt2_small model.max_seq_len="$SEQ_LEN" data=embedded logging=disabled train.resume=none
  train.seq_len="$SEQ_LEN" train.micro_batch=2 train.batch_tokens=$((SEQ_LEN * 8)) train.max_steps=100000
  train.time_limit_s="$SECONDS_PER_RUN" train.eval_every=0 train.eval_batches=1 train.ckpt_every=0
  optim.warmup_steps=10 "root=$OUT/root")

python train.py "${COMMON[@]}" attention=dense out_dir="$OUT/dense" 2>&1 | tail -n 2
python train.py "${COMMON[@]}" attention=sfa attention.k=8 attention.backend=masked out_dir="$OUT/sfa-k8-masked" 2>&1 | tail -n 2
python train.py "${COMMON[@]}" attention=sfa attention.k=8 attention.backend=flash out_dir="$OUT/sfa-k8-flash" 2>&1 | tail -n 2
python scripts/summarize_throughput.py "$OUT/dense" "$OUT/sfa-k8-masked" "$OUT/sfa-k8-flash" --out "$OUT/e2e_throughput.json"
