#!/usr/bin/env bash
# The small-scale quality study of docs/results.md: every arm of configs/experiment/study_{gpt2,qwen3}.yaml,
# one after another on one GPU, then scripts/plot_runs.py over each family.
#   scripts/quality_study.sh [OUT_DIR] [extra Hydra overrides for every arm...]
# Writes OUT_DIR/{gpt2,qwen3}/<arm>/ (run dirs) and OUT_DIR/plots_{gpt2,qwen3}/ (PNGs + summary.json).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workspace/quality_study}
shift || true
mkdir -p "$OUT"

run_arm() {  # family arm overrides...
  local family=$1 arm=$2
  shift 2
  python train.py "experiment=study_$family" logging=disabled train.resume=none "root=$OUT/root" \
    "out_dir=$OUT/$family/$arm" "$@" "${EXTRA[@]}" 2>&1 | tail -n 3
}
EXTRA=("$@")

run_arm gpt2 dense attention=dense
for k in 2 4 8 16; do run_arm gpt2 "sfa-k$k" attention=sfa attention.k=$k; done
run_arm gpt2 short-d32 attention=short attention.d_short=32

run_arm qwen3 dense attention=dense
run_arm qwen3 sfa-k16 attention=sfa attention.k=16
run_arm qwen3 sfa-k16-fmap attention=sfa attention.k=16 attention.feature_map=true
run_arm qwen3 short-d64 attention=short attention.d_short=64

for family in gpt2 qwen3; do
  python scripts/plot_runs.py "$OUT/$family"/* --out "$OUT/plots_$family" | tail -n 12
done
