#!/usr/bin/env bash
# The scale-up comparison (docs/results.md section 5) on one multi-GPU host, through torchrun + FSDP2:
#   1. scaling: dense and the best SFA form for SCALING_S seconds each on 1, 2 and NGPU GPUs (same global batch),
#      each stopped by train.time_limit_s with a checkpoint, then resumed once for a few steps: tokens/s, MFU,
#      peak memory per GPU, checkpoint save and resume times;
#   2. arms: the full experiment=scaleup_qwen3_0.6b run of each arm on NGPU GPUs (the same tokens for every arm);
#   3. kill: the best SFA arm again, with rank 1 SIGKILLed at step KILL_STEP (first attempt only) under
#      torchrun --max-restarts=1: it must resume from its last checkpoint and follow the uninterrupted arm;
#   4. the tables (scripts/summarize_scaleup.py): OUT/scaleup.json and stdout.
#
#   scripts/scaleup.sh OUT                              # NGPU = all visible GPUs
#   STAGES="scaling" NGPU=4 scripts/scaleup.sh OUT      # only some stages; finished runs are skipped
#   CORPUS_DIR=/path/to/parts scripts/scaleup.sh OUT    # pkg_corpus parts carried to a machine without a registry
#   EXTRA_OVERRIDES="model=qwen3_tiny data=embedded ..." NGPU=2 SCALING_SIZES=2 scripts/scaleup.sh OUT   # CPU rehearsal
#                                                       (gloo; tests/test_scaleup.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/scaleup.sh OUT}
NGPU=${NGPU:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
STAGES=${STAGES:-"scaling arms kill"}
SCALING_S=${SCALING_S:-60}
KILL_STEP=${KILL_STEP:-200}
# name=overrides; the first SFA arm is "the best SFA form" (docs/results.md section 1d), used for scaling and kill
ARMS=${ARMS:-"dense=attention=dense sfa-k16-rope32=attention=sfa,attention.k=16,attention.rope=decoupled,attention.rope_dims=32 sfa-k16=attention=sfa,attention.k=16"}
BEST=${BEST:-sfa-k16-rope32}
SCALING_ARMS=${SCALING_ARMS:-"dense $BEST"}
read -r -a extra <<<"${EXTRA_OVERRIDES:-}"
[[ -n ${CORPUS_DIR:-} ]] && extra+=("data.corpus_dir=$CORPUS_DIR")
common=(experiment=scaleup_qwen3_0.6b "root=$OUT/root" logging=disabled "${extra[@]}")
# torchrun shares its rendezvous store with the workers by default, and restarted workers then read the dead
# attempt's addresses (pytorch/pytorch#135712); one store per attempt avoids it (docs/reliability.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
mkdir -p "$OUT/logs"

arm_overrides() {  # arm name -> its overrides, one per line
  local entry
  for entry in $ARMS; do
    if [[ ${entry%%=*} == "$1" ]]; then tr ',' '\n' <<<"${entry#*=}"; return; fi
  done
  echo "scaleup.sh: no arm named $1 in ARMS" >&2; exit 2
}

finished() {  # run dir -> true if it reached its train.max_steps with a val loss (scripts/run_finished.py)
  python scripts/run_finished.py "$1"
}

launch() {  # nproc log out_dir [torchrun options --] overrides...
  local n=$1 log=$2 dir=$3; shift 3
  local opts=()
  while (($#)) && [[ $1 != -- ]]; do opts+=("$1"); shift; done
  [[ ${1:-} == -- ]] && shift
  echo "[$(date +%H:%M:%S)] $n process(es): $dir"
  torchrun --standalone --nproc_per_node="$n" "${opts[@]}" train.py "${common[@]}" "$@" "out_dir=$dir" >"$log" 2>&1 \
    || { echo "scaleup.sh: run failed, see $log" >&2; tail -n 20 "$log" >&2; return 1; }
}

if [[ " $STAGES " == *" scaling "* ]]; then
  # FSDP2 on one process needs a GPU (training/distributed.py), so a CPU rehearsal sets SCALING_SIZES=2.
  sizes=${SCALING_SIZES:-$(python -c "print(' '.join(str(n) for n in sorted({1, min(2, $NGPU), $NGPU})))")}
  for arm in $SCALING_ARMS; do
    mapfile -t over < <(arm_overrides "$arm")
    for n in $sizes; do
      dir=$OUT/scaling/$arm-${n}gpu
      [[ -f $dir/resumed.done ]] && continue
      # No eval; the time limit stops the run with a checkpoint (its save time is logged), then a resume runs
      # a few more steps (its load time is logged): the same command with a larger train.max_steps.
      launch "$n" "$OUT/logs/scaling-$arm-${n}gpu.log" "$dir" -- "${over[@]}" train.time_limit_s="$SCALING_S" \
        train.eval_every=0 train.eval_batches=1 train.ckpt_every=0
      reached=$(python -c "import json; print(max(json.loads(l)['step'] for l in open('$dir/metrics.jsonl') if l.strip()))")
      launch "$n" "$OUT/logs/scaling-$arm-${n}gpu-resume.log" "$dir" -- "${over[@]}" train.time_limit_s="$SCALING_S" \
        train.eval_every=0 train.eval_batches=1 train.ckpt_every=0 train.max_steps=$((reached + 3))
      touch "$dir/resumed.done"
    done
  done
fi

if [[ " $STAGES " == *" arms "* ]]; then
  for entry in $ARMS; do
    arm=${entry%%=*}
    dir=$OUT/arms/$arm
    finished "$dir" && continue
    mapfile -t over < <(arm_overrides "$arm")
    launch "$NGPU" "$OUT/logs/arm-$arm.log" "$dir" -- "${over[@]}"
  done
fi

if [[ " $STAGES " == *" kill "* ]] && ((NGPU >= 2)); then
  dir=$OUT/kill/$BEST
  if ! finished "$dir"; then
    mapfile -t over < <(arm_overrides "$BEST")
    SFA_TEST_HOOK="die@$KILL_STEP:1" launch "$NGPU" "$OUT/logs/kill-$BEST.log" "$dir" --max-restarts=1 -- "${over[@]}"
  fi
fi

python scripts/summarize_scaleup.py "$OUT" --best "$BEST"
