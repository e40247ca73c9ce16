#!/usr/bin/env bash
# Needle-in-a-haystack study (issue #5; the paper's Table 2 at the lengths one GPU allows): for each training
# context C (default 2048 and 8192), make NIAH training data at seq_len C (loss on the answer only), train
# gpt2_tiny from scratch with dense attention and with SFA k=8 for a fixed wall time each, evaluate exact match
# at prompt lengths up to C over a depth grid, then print accuracy vs length and write OUT/summary.json.
#
#   scripts/niah_study.sh OUT [extra hydra overrides for every training run]
#   NIAH_SMOKE=1 scripts/niah_study.sh /tmp/niah-smoke        # CPU, ~1 min: tiny model, contexts 128/256
#
# Budget (estimated, not yet run on a GPU): about 8-9 minutes on one H100 with the defaults (2 data sets, 4 trainings of about NIAH_TRAIN_S
# seconds plus start-up, 4 evaluations); scripts/niah_curriculum.sh is what ran (docs/results.md 3c). Offline, logging=disabled. Each arm writes OUT/<C>-<arm>/{run,eval}/ and a
# .done marker: running the script again on the same OUT skips finished steps and redoes unfinished ones.
# The summary covers every arm evaluated in OUT, so longer training fits the same budget one context per
# call:  NIAH_CONTEXTS=2048 NIAH_TRAIN_S=180 scripts/niah_study.sh OUT; NIAH_CONTEXTS=8192 NIAH_TRAIN_S=180 ...
# Knobs (environment): NIAH_CONTEXTS ("2048 8192"), NIAH_TRAIN_S (60), NIAH_SAMPLES (eval prompts per length
# and depth, 20), NIAH_DEPTHS (0,0.25,0.5,0.75,1), NIAH_TOKENS_PER_STEP (32768), NIAH_PACK (0: one sample per
# training window, so no other sample's needle is in view; 1: pack several where they fit), PYTHON (python3).
# Needs torch, numpy, tiktoken (GPT-2 BPE), matplotlib (heatmaps), tqdm, PyYAML and hydra-core/omegaconf.
set -euo pipefail

OUT=${1:?usage: scripts/niah_study.sh OUT [hydra overrides for train.py ...]}
shift
EXTRA=("$@")
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

CONTEXTS=${NIAH_CONTEXTS:-2048 8192}
TRAIN_S=${NIAH_TRAIN_S:-60}
SAMPLES=${NIAH_SAMPLES:-20}
DEPTHS=${NIAH_DEPTHS:-0,0.25,0.5,0.75,1}
TOKENS_PER_STEP=${NIAH_TOKENS_PER_STEP:-32768}
PACKING=(--one-per-window)
[[ "${NIAH_PACK:-0}" == 1 ]] && PACKING=()
MODEL=(model=gpt2_tiny)
# Dense trains for a fixed wall time (train.time_limit_s); SFA then trains for exactly as many steps (same
# samples, same schedule), so Triton compilation and SFA's slower step do not cost it training. The cosine
# horizon (optim.decay_steps) is set far away for both: the learning rate stays near its peak after warm-up.
MAX_STEPS=100000
OPTIM=(optim.lr=1.5e-3 optim.warmup_steps=50 "optim.decay_steps=$MAX_STEPS")
DEVICE=auto
if [[ "${NIAH_SMOKE:-0}" == 1 ]]; then  # the whole pipeline on a CPU in about a minute
  CONTEXTS=${NIAH_CONTEXTS:-128 256}
  SAMPLES=${NIAH_SAMPLES:-1}
  DEPTHS=${NIAH_DEPTHS:-0,1}
  TOKENS_PER_STEP=${NIAH_TOKENS_PER_STEP:-512}
  MODEL=(model=gpt2_tiny model.n_layer=1 model.d_model=64 model.n_head=2)
  MAX_STEPS=3
  OPTIM=(optim.warmup_steps=1 "optim.decay_steps=$MAX_STEPS")
  DEVICE=cpu
fi

# Prompt lengths drawn for training and evaluated, per context. The longest prompt a training window of C + 1
# tokens holds is C - 6 (the leading eot and up to 6 answer tokens: evaluation/niah_data.py).
train_lengths() {
  case $1 in
    2048) echo 256,512,1024,2042 ;;
    8192) echo 512,1024,2048,4096,8186 ;;
    *) echo "$(($1 / 2)),$(($1 - 6))" ;;
  esac
}
eval_lengths() {  # eot + prompt + answer budget (answer tokens + 1, at most 7) must fit max_seq_len = C
  case $1 in
    2048) echo 512,1024,2040 ;;
    8192) echo 1024,2048,4096,8184 ;;
    *) echo "$(($1 / 2)),$(($1 - 8))" ;;
  esac
}
train_samples() {  # 6e7 tokens of windows: ~60 s of training at 1M tokens/s before samples repeat (smoke: a few)
  if [[ "${NIAH_SMOKE:-0}" == 1 ]]; then echo 40; else echo $((60000000 / $1)); fi
}

log() { echo "[niah_study $(date -u +%H:%M:%S)] $*"; }

for C in $CONTEXTS; do
  data="$OUT/data-$C"
  if [[ ! -f "$data/.done" ]]; then
    log "make-data seq_len=$C lengths=$(train_lengths "$C")"
    "$PY" "$REPO/scripts/niah.py" make-data --out "$data" --overwrite --seq-len "$C" --lengths "$(train_lengths "$C")" \
      --train-samples "$(train_samples "$C")" --val-samples 64 --loss-on answer "${PACKING[@]}"
    touch "$data/.done"
  fi
  micro=$((TOKENS_PER_STEP / C)); ((micro >= 1)) || micro=1
  for arm in dense sfa; do
    dir="$OUT/$C-$arm"
    attention=(attention=dense)
    [[ $arm == sfa ]] && attention=(attention=sfa attention.k=8)
    if [[ ! -f "$dir/run/.done" ]]; then
      rm -rf "$dir/run" "$dir/eval"
      if [[ $arm == dense ]]; then
        limits=("train.max_steps=$MAX_STEPS" "train.time_limit_s=$TRAIN_S")
      else  # the steps dense reached; twice its time as a safety stop
        steps=$("$PY" -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["step"])' \
          "$OUT/$C-dense/run/metrics.jsonl")
        limits=("train.max_steps=$steps" "train.time_limit_s=$((2 * TRAIN_S))")
      fi
      log "train $arm at $C (${limits[*]})"
      (cd "$REPO" && "$PY" train.py "${MODEL[@]}" "model.max_seq_len=$C" "${attention[@]}" "${OPTIM[@]}" "data.dir=$data" \
        "train.seq_len=$C" "train.micro_batch=$micro" "train.batch_tokens=$((micro * C))" "${limits[@]}" \
        train.eval_every=0 train.ckpt_every=0 train.eval_batches=4 train.log_every=50 \
        train.keep_checkpoints=1 "train.device=$DEVICE" logging=disabled "out_dir=$dir/run" "run_name=niah-$C-$arm" \
        "${EXTRA[@]}") 2>&1 | tee "$dir.train.log"
      touch "$dir/run/.done"
    fi
    if [[ ! -f "$dir/eval/niah.json" ]]; then
      log "eval $arm at $C: lengths $(eval_lengths "$C")"
      "$PY" "$REPO/scripts/niah.py" eval --checkpoint "$dir/run" --lengths "$(eval_lengths "$C")" --depths "$DEPTHS" \
        --samples "$SAMPLES" --batch-size 10 --device "$DEVICE" --out "$dir/eval" 2>&1 | tee "$dir.eval.log"
    fi
  done
done
# Every arm evaluated in OUT so far, this invocation's and earlier ones' (e.g. one context per invocation).
mapfile -t evals < <(ls -d "$OUT"/*-dense/eval/niah.json "$OUT"/*-sfa/eval/niah.json 2>/dev/null | sort -V)
"$PY" "$REPO/scripts/niah.py" summarize --out "$OUT/summary.json" "${evals[@]}" | tee "$OUT/summary.txt"
