#!/usr/bin/env bash
# The quality study of docs/results.md: every arm of configs/experiment/${STUDY}_{gpt2,qwen3}.yaml, one after
# another on one GPU, then scripts/plot_runs.py over each family.
#   scripts/quality_study.sh [OUT_DIR] [extra Hydra overrides for every arm...]
#   STUDY=study_large scripts/quality_study.sh OUT      # the 12-layer study (section 1b of docs/results.md)
#   scripts/quality_study.sh --list-arms                # "family arm overrides..." per line (scripts/quality_seeds.sh)
#   scripts/quality_study.sh --one OUT FAMILY ARM [extra overrides...]   # one arm, no plots
# Writes OUT_DIR/{gpt2,qwen3}/<arm>/ (run dirs) and OUT_DIR/plots_{gpt2,qwen3}/ (PNGs + summary.json).
# STUDY (default `study`) picks the experiment configs; the arms are the same in every study.
# An arm whose run dir holds a checkpoint continues from it (train.resume=auto): a run cut off by a time limit
# (SIGTERM saves a checkpoint) finishes on the next call instead of starting over; its metrics past the
# checkpoint are replayed, not duplicated.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY=${STUDY:-study}

list_arms() {  # the one list of arms: family, arm name, its attention overrides
  echo "gpt2 dense attention=dense"
  for k in 2 4 8 16; do echo "gpt2 sfa-k$k attention=sfa attention.k=$k"; done
  echo "gpt2 short-d32 attention=short attention.d_short=32"
  echo "qwen3 dense attention=dense"
  echo "qwen3 sfa-k16 attention=sfa attention.k=16"
  echo "qwen3 sfa-k16-fmap attention=sfa attention.k=16 attention.feature_map=true"
  echo "qwen3 short-d64 attention=short attention.d_short=64"
  # The RoPE axis (docs/results.md "RoPE and SFA"): decoupled = the first rope_dims of each q/k head rotary and
  # dense, top-k over the un-rotated rest; KV bytes per KV head and token in the comment (dense: 512).
  echo "qwen3 sfa-k16-nope attention=sfa attention.k=16 attention.rope=none"                      # 304
  echo "qwen3 sfa-k16-rope16 attention=sfa attention.k=16 attention.rope=decoupled attention.rope_dims=16"  # 336
  echo "qwen3 sfa-k16-rope32 attention=sfa attention.k=16 attention.rope=decoupled attention.rope_dims=32"  # 368
  echo "qwen3 sfa-k8-rope32 attention=sfa attention.k=8 attention.rope=decoupled attention.rope_dims=32"    # 344
  echo "qwen3 sfa-k16-rope16-tlearn attention=sfa attention.k=16 attention.rope=decoupled attention.rope_dims=16 attention.scale=learned"
  echo "qwen3 dense-rope16 attention=dense attention.rope=decoupled attention.rope_dims=16"        # 512
  echo "qwen3 dense-rope32 attention=dense attention.rope=decoupled attention.rope_dims=32"        # 512
  echo "qwen3 short-d48 attention=short attention.d_short=48"                                      # 352
  echo "qwen3 short-d32 attention=short attention.d_short=32"                                      # 320
  echo "qwen3 sfa-k12-rope32 attention=sfa attention.k=12 attention.rope=decoupled attention.rope_dims=32"  # 356 (0.695x)
  # rope_shared: one rotary key per token shared by every KV head (MLA), stored once per layer, so its bytes are
  # per token and LAYER: 2r + Hkv * (3k + 2Dv); at STUDY=study_pkg/study_large's 3 KV heads, D = Dv = 128 that
  # is in the comment, against dense 3 * 512 = 1536 (per-KV-head arms x3: sfa-k12-rope32 is 1068, 0.695x).
  echo "qwen3 sfa-k16-rope32s attention=sfa attention.k=16 attention.rope=decoupled attention.rope_dims=32 attention.rope_shared=true"  # 976 (0.635x)
  echo "qwen3 sfa-k16-rope64s attention=sfa attention.k=16 attention.rope=decoupled attention.rope_dims=64 attention.rope_shared=true"  # 1040 (0.677x)
  # The bytes the shared key frees spent on k (most of decoupled's gap is sparsity, docs/results.md §1d):
  echo "qwen3 sfa-k24-rope32s attention=sfa attention.k=24 attention.rope=decoupled attention.rope_dims=32 attention.rope_shared=true"  # 1048 (0.682x)
  echo "qwen3 dense-rope64s attention=dense attention.rope=decoupled attention.rope_dims=64 attention.rope_shared=true"  # 1536 (plain dense cache)
}

run_arm() {  # OUT family arm [extra overrides...]
  local out=$1 family=$2 arm=$3
  shift 3
  local line
  line=$(list_arms | awk -v f="$family" -v a="$arm" '$1 == f && $2 == a')
  [[ -n $line ]] || { echo "quality_study.sh: no arm '$family $arm'; arms: $(list_arms | cut -d' ' -f1,2 | tr '\n' ',')" >&2; exit 2; }
  read -r -a arm_overrides <<<"$(cut -d' ' -f3- <<<"$line")"
  local config=configs/experiment/${STUDY}_$family.yaml
  [[ -f $config ]] || { echo "quality_study.sh: STUDY=$STUDY has no $config" >&2; exit 2; }
  python train.py "experiment=${STUDY}_$family" logging=disabled train.resume=auto "root=$out/root" \
    "out_dir=$out/$family/$arm" "${arm_overrides[@]}" "$@" </dev/null 2>&1 | tail -n 3
}

case ${1:-} in
  --list-arms) list_arms; exit 0 ;;
  --one) shift; (($# >= 3)) || { echo "usage: quality_study.sh --one OUT FAMILY ARM [overrides...]" >&2; exit 2; }
         run_arm "$@"; exit 0 ;;
esac

OUT=${1:-workspace/quality_study}
shift || true
mkdir -p "$OUT"
while read -r family arm _; do run_arm "$OUT" "$family" "$arm" "$@"; done < <(list_arms)

for family in gpt2 qwen3; do
  python scripts/plot_runs.py "$OUT/$family"/* --out "$OUT/plots_$family" | tail -n 12
done
