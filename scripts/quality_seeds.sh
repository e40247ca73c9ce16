#!/usr/bin/env bash
# The quality study (scripts/quality_study.sh, every arm of configs/experiment/study_{gpt2,qwen3}.yaml) repeated
# over several seeds, one seed per GPU at a time, then mean and spread of each arm's final val loss.
#
#   scripts/quality_seeds.sh OUT SEED [SEED ...]            # e.g. scripts/quality_seeds.sh workspace/qs 2 3
#   NGPU=1 scripts/quality_seeds.sh OUT 2 3 4               # one GPU: seeds one after another
#   EXTRA_RUNS=docs/results/quality_study_2026-11-27_h100/runs scripts/quality_seeds.sh OUT 2 3   # pool earlier seeds
#   OVERRIDES="train.max_steps=2 train.eval_every=1" scripts/quality_seeds.sh OUT 1 2   # extra Hydra overrides, every arm
#
# Writes OUT/seed<S>/{gpt2,qwen3}/<arm>/ (run dirs), OUT/seed<S>.log, and OUT/seeds.json + a table on stdout
# (scripts/summarize_seeds.py). The seed changes weight init, data order and dropout; data and tokens are fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/quality_seeds.sh OUT SEED [SEED ...]}
shift
(($# >= 1)) || { echo "quality_seeds.sh: give at least one seed" >&2; exit 2; }
mkdir -p "$OUT"
NGPU=${NGPU:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}

running=()
for seed in "$@"; do
  gpu=$(( ${#running[@]} % NGPU ))
  echo "[quality_seeds $(date -u +%H:%M:%S)] seed $seed on GPU $gpu"
  CUDA_VISIBLE_DEVICES=$gpu bash scripts/quality_study.sh "$OUT/seed$seed" train.seed="$seed" ${OVERRIDES:-} >"$OUT/seed$seed.log" 2>&1 &
  running+=($!)
  if (( ${#running[@]} == NGPU )); then
    for pid in "${running[@]}"; do wait "$pid"; done
    running=()
  fi
done
for pid in "${running[@]}"; do wait "$pid"; done

python scripts/summarize_seeds.py "$OUT"/seed*/ ${EXTRA_RUNS:+"$EXTRA_RUNS"} --out "$OUT/seeds.json"
