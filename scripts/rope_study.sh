#!/usr/bin/env bash
# The RoPE-SFA study (docs/results.md section 1d) on one GPU, in two stages; resumable, so a machine with a time
# limit can run it over several calls with the same command (finished runs are skipped):
#   1. screen: 200 steps (6.6M tokens) of each SCREEN_ARMS arm, seed 1337, on experiment=study_pkg_qwen3;
#   2. full: dense, the decoupled SFA arm with the lowest screen val loss, and FULL_EXTRA_ARMS, at 960 steps
#      (31.5M tokens, each seen once), over SEEDS (seeds outermost: a cut-off call leaves whole seeds done).
#   scripts/rope_study.sh OUT                       # OUT/screen, OUT/full, tables on stdout
#   STOP_AFTER_S=500 scripts/rope_study.sh OUT      # start no run after 500 s; call again to go on
#   CORPUS_DIR=/path/to/parts scripts/rope_study.sh OUT   # pkg_corpus parts carried to a machine without a registry
#   EXTRA_OVERRIDES="model.n_layer=1 ..." scripts/rope_study.sh OUT   # appended to every run (smoke tests)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/rope_study.sh OUT}
SCREEN_ARMS=${SCREEN_ARMS:-"qwen3/dense qwen3/sfa-k16 qwen3/sfa-k16-rope16 qwen3/sfa-k16-rope32 qwen3/sfa-k8-rope32 qwen3/sfa-k16-rope16-tlearn qwen3/short-d48"}
FULL_EXTRA_ARMS=${FULL_EXTRA_ARMS:-"qwen3/short-d48 qwen3/sfa-k16"}
SEEDS=${SEEDS:-"1337 2 3"}
started=$(date +%s)
extra=()
[[ -n ${CORPUS_DIR:-} ]] && extra+=("data.corpus_dir=$CORPUS_DIR")
read -r -a more <<<"${EXTRA_OVERRIDES:-}"
extra+=("${more[@]}")
# Both stages share one prepared copy of the data.
mkdir -p "$OUT"
export STUDY=study_pkg NGPU=1

left() {  # seconds of STOP_AFTER_S left, or a large number
  if [[ -n ${STOP_AFTER_S:-} ]]; then echo $((STOP_AFTER_S - ($(date +%s) - started))); else echo 999999; fi
}

ARMS=$SCREEN_ARMS STOP_AFTER_S=$(left) \
  OVERRIDES="train.max_steps=200 optim.warmup_steps=20 train.eval_every=50 train.diagnostics_every=50 root=$OUT/root ${extra[*]}" \
  bash scripts/quality_seeds.sh "$OUT/screen" 1337 | tail -n 14

best=$(python - "$OUT/screen/seeds_final.json" <<'PY'
import json, sys
arms = json.load(open(sys.argv[1]))["families"]["qwen3"]
decoupled = {a: r["mean"] for a, r in arms.items() if a.startswith("sfa") and "rope" in a and r["n"] >= 1}
print(min(decoupled, key=decoupled.get) if decoupled else "")
PY
) || best=""
if [[ -z $best ]]; then echo "rope_study.sh: the screen has no finished decoupled SFA arm yet; call again" >&2; exit 0; fi
echo "rope_study.sh: best decoupled arm of the screen: $best"
(($(left) > 0)) || exit 0
ARMS="qwen3/dense qwen3/$best $FULL_EXTRA_ARMS" STOP_AFTER_S=$(left) \
  OVERRIDES="root=$OUT/root ${extra[*]}" bash scripts/quality_seeds.sh "$OUT/full" $SEEDS | tail -n 14
