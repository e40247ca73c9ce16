#!/usr/bin/env bash
# The quality study (every arm of scripts/quality_study.sh --list-arms) repeated over several seeds, as one queue
# of (seed, arm) runs spread over the GPUs (one run per GPU at a time, the next free GPU takes the next run), then
# each arm's mean and spread of final val loss (scripts/summarize_seeds.py) and plots of one seed per family.
#
#   scripts/quality_seeds.sh OUT SEED [SEED ...]            # e.g. scripts/quality_seeds.sh workspace/qs 1337 2 3
#   NGPU=1 scripts/quality_seeds.sh OUT 2 3 4               # one GPU: runs one after another
#   STUDY=study_large scripts/quality_seeds.sh OUT 1337 2 3 # the 12-layer study's configs
#   ARMS="gpt2/dense gpt2/sfa-k8" scripts/quality_seeds.sh OUT 1337 2   # only these arms
#   EXTRA_RUNS=docs/results/quality_study_2026-11-27_h100/runs scripts/quality_seeds.sh OUT 2 3   # pool earlier seeds
#   OVERRIDES="train.max_steps=2 train.eval_every=1" scripts/quality_seeds.sh OUT 1 2   # extra Hydra overrides, every arm
#   STOP_AFTER_S=420 scripts/quality_seeds.sh OUT 1337 2 3  # start no run after 420 s (a machine with a time limit)
#
# Writes OUT/seed<S>/{gpt2,qwen3}/<arm>/ (run dirs; all runs share OUT/root for the prepared data), OUT/logs/,
# OUT/seeds_{final,best}.json + tables on stdout (last and lowest val loss of each finished run). A run whose
# metrics.jsonl already has its final val loss is skipped, and one cut off with a checkpoint continues from it
# (scripts/quality_study.sh), so a second call with the same arguments finishes what a first one left.
# The seed changes weight init, data order and dropout; data and tokens are fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/quality_seeds.sh OUT SEED [SEED ...]}
shift
(($# >= 1)) || { echo "quality_seeds.sh: give at least one seed" >&2; exit 2; }
mkdir -p "$OUT/logs"
NGPU=${NGPU:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
read -r -a overrides <<<"${OVERRIDES:-}"

# The queue: one line "seed family arm" per run, seeds outermost so a cut-off call leaves whole seeds done.
queue=$OUT/queue.txt
: >"$queue"
for seed in "$@"; do
  while read -r family arm _; do
    if [[ -z ${ARMS:-} || " $ARMS " == *" $family/$arm "* ]]; then echo "$seed $family $arm" >>"$queue"; fi
  done < <(bash scripts/quality_study.sh --list-arms)
done
[[ -s $queue ]] || { echo "quality_seeds.sh: ARMS='${ARMS:-}' matches no arm of scripts/quality_study.sh --list-arms" >&2; exit 2; }
echo 0 >"$OUT/queue.next"
started=$(date +%s)

finished() {  # run dir -> true if it reached its train.max_steps with a val loss (scripts/run_finished.py)
  python scripts/run_finished.py "$1"
}

worker() {  # GPU index: take the next queued run until none are left
  local gpu=$1 i seed family arm
  while true; do
    i=$(flock "$OUT/queue.lock" bash -c 'i=$(cat "$1"); echo $((i + 1)) >"$1"; echo "$i"' _ "$OUT/queue.next")
    read -r seed family arm < <(sed -n "$((i + 1))p" "$queue") || true
    [[ -n ${seed:-} ]] || return 0
    if [[ -n ${STOP_AFTER_S:-} ]] && (($(date +%s) - started >= STOP_AFTER_S)); then
      echo "[gpu $gpu] STOP_AFTER_S=$STOP_AFTER_S reached: seed $seed $family/$arm and later runs not started"; return 0
    fi
    if finished "$OUT/seed$seed/$family/$arm"; then echo "[gpu $gpu] seed $seed $family/$arm: done before, skipped"; seed=; continue; fi
    echo "[gpu $gpu $(date -u +%H:%M:%S)] seed $seed $family/$arm"
    CUDA_VISIBLE_DEVICES=$gpu bash scripts/quality_study.sh --one "$OUT/seed$seed" "$family" "$arm" \
      train.seed="$seed" "root=$OUT/root" "${overrides[@]}" >"$OUT/logs/seed$seed-$family-$arm.log" 2>&1 ||
      echo "[gpu $gpu] seed $seed $family/$arm FAILED (log: $OUT/logs/seed$seed-$family-$arm.log)"
    seed=
  done
}

pids=()
for ((gpu = 0; gpu < NGPU; gpu++)); do worker "$gpu" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done

compgen -G "$OUT/seed*/*/*/metrics.jsonl" >/dev/null || { echo "quality_seeds.sh: no run finished in $OUT, nothing to summarize" >&2; exit 1; }
for metric in final best; do
  python scripts/summarize_seeds.py "$OUT"/seed*/ ${EXTRA_RUNS:+"$EXTRA_RUNS"} --metric $metric --out "$OUT/seeds_$metric.json"
done
first=$(ls -d "$OUT"/seed* | head -n 1)
for family in gpt2 qwen3; do
  if compgen -G "$first/$family/*" >/dev/null; then
    python scripts/plot_runs.py "$first/$family"/* --out "$OUT/plots_$family" | tail -n 12
  fi
done
