#!/usr/bin/env bash
# A queue of study runs, GPU tests and benchmarks for one call to a lent GPU machine with a wall-clock limit:
# every job is cut to the time left, a cut training run is given time to save its checkpoint (train.py's SIGTERM
# handler), and the next call with the same jobs resumes it (train.resume=auto). Run dirs stay on the machine
# (under workspace/, which survives between calls while the machine is held) and are copied without checkpoints
# to $OUT/runs.tgz after every call.
#
#   scripts/gpu_session.sh DEADLINE_S JOB [JOB ...]
# JOBs:
#   FAMILY:ARM:SEED      one arm of scripts/quality_study.sh --list-arms (STUDY, default study_pkg), e.g. qwen3:dense:2
#   tests:PATH[,PATH]    scripts/gpu_tests.sh on those test files (log to $OUT/gpu_tests_<files>.log)
#   profile_generate[:MODE[:BATCH]]  scripts/profile_generate.py, dense and SFA, 32k context, MODE graph (default),
#                        compile or eager, BATCH sequences (default 1)
#   profile_train[:SHAPE[:eager]]  scripts/profile_train.py: the kernels of dense, SFA masked and flash training
#                        steps at SHAPE (default gpt2_1k), compiled unless "eager"
#   e2e_epilogue[:compile]   scripts/e2e_throughput.py, Qwen3 1k, dense vs masked SFA, fused vs unfused QK
#                        epilogue, eager (default) or compiled
#   e2e_gpt2:SHAPE[:compile]  scripts/e2e_throughput.py, GPT-2 small at SHAPE (1k or 8k), dense vs SFA masked and
#                        flash, eager (default) or compiled (3 compiled arms take ~7 min: one shape per call)
#   bench_epilogue       scripts/bench_topk.py --epilogue-only: the fused QK epilogue against the unfused ops
#   bench_generate_points    scripts/bench_generate.py at B=4, 32k: dense, short, SFA by graph and compile, and
#                        HF generate at B=4, 4k (the points docs/inference.md lists as not run)
#   bench_generate_plan[:PLAN]  scripts/bench_generate.py at B=4, 32k, compiled: SFA with the shipped decode launch
#                        plan, SFA with PLAN (--decode-plan KEY=INT,...; default SPLIT_CAP=128,num_stages=3, an
#                        earlier bench_decode best for Qwen3-0.6B's heads), dense
#   bench_decode[:QHEADS]    scripts/bench_decode.py with QHEADS query heads over 8 KV heads (default 16, Qwen3-0.6B's),
#                        B=1,4,8,16 at 32k and 128k (1, 4 and 8 query rows at 32k), with its launch-config sweep
# Environment: OUT (results folder, default workspace/gpu_session_out); STUDY (default study_pkg); CORPUS_DIR
# (pkg_corpus parts, default .carry/pkg_corpus for STUDY=study_pkg, none for the other studies' corpora); WHEELS
# (hydra/omegaconf wheels from scripts/gpu_wheels.sh, default .whl); RUNS (run dirs, default workspace/rope/full);
# OVERRIDES (extra Hydra overrides for every training run); GIT_COMMIT (the commit the copied tree is at; it
# travels without .git); PACK_OUT=1 packs everything in OUT but runs.tgz into OUT/results.tgz at the end (for a
# device tool that returns at most 8 files, 2 folders deep).
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=${1:?usage: scripts/gpu_session.sh DEADLINE_S JOB [JOB ...]}
shift
OUT=${OUT:-workspace/gpu_session_out}
WHEELS=${WHEELS:-.whl}
RUNS=${RUNS:-workspace/rope/full}
STUDY=${STUDY:-study_pkg}
[[ $STUDY == study_pkg ]] && CORPUS_DIR=${CORPUS_DIR:-.carry/pkg_corpus}
corpus=()
[[ -n ${CORPUS_DIR:-} ]] && corpus=("data.corpus_dir=$CORPUS_DIR")
read -r -a overrides <<<"${OVERRIDES:-}"
CHECKPOINT_GRACE_S=45   # a cut run's checkpoint of a 124M model takes seconds; leave it room
start=$(date +%s)
mkdir -p "$OUT" "$RUNS"
export GIT_COMMIT=${GIT_COMMIT:-unknown}

if ! python -c "import hydra" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl >/dev/null
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

left() { echo $((DEADLINE_S - ($(date +%s) - start))); }
summary=()

run_timed() {  # NAME LIMIT_S COMMAND...: run with SIGTERM at LIMIT_S, SIGKILL after the grace time
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=$CHECKPOINT_GRACE_S "$limit" "$@"
  local rc=$?
  summary+=("$(printf '%-40s rc=%-4s %5ss' "$name" "$rc" $(($(date +%s) - t0)))")
}

too_late() {  # NAME: true (and noted) when less than 20 s would be left for it before the checkpoint grace
  budget=$(($(left) - CHECKPOINT_GRACE_S))
  ((budget < 20)) && summary+=("$(printf '%-40s not started: %ss left' "$1" "$(left)")")
}

for job in "$@"; do
  too_late "$job" && continue
  case $job in
    tests:*)
      IFS=, read -r -a paths <<<"${job#tests:}"
      tag=$(basename -a "${paths[@]}" | sed 's/\.py$//' | paste -sd_)
      GPU_TESTS_LOG=$OUT/gpu_tests_$tag.log run_timed "$job" "$budget" bash scripts/gpu_tests.sh "${paths[@]}" \
        >"$OUT/stdout_tests_$tag.txt" 2>&1
      tail -n 3 "$OUT/stdout_tests_$tag.txt" ;;
    profile_generate | profile_generate:*)
      IFS=: read -r _ mode batch <<<"$job"
      mode=${mode:-graph} batch=${batch:-1}
      for a in dense sfa; do
        tag=${a}_${mode}_b$batch
        too_late "profile_generate $a $mode B=$batch" && continue
        run_timed "profile_generate $a $mode B=$batch" "$budget" python scripts/profile_generate.py \
          --attention $a --batch "$batch" --context 32768 --mode "$mode" --out "$OUT/profile_generate_$tag.json" \
          >"$OUT/profile_generate_$tag.txt" 2>&1
        tail -n 25 "$OUT/profile_generate_$tag.txt"
      done ;;
    profile_train | profile_train:*)
      IFS=: read -r _ shape compiled <<<"$job"
      shape=${shape:-gpt2_1k} compile=on
      [[ $compiled == eager ]] && compile=off
      tag=profile_train_${shape}_compile_$compile
      run_timed "$job" "$budget" python scripts/profile_train.py --shape "$shape" --attention dense masked flash \
        --compile $compile --out "$OUT/$tag.json" >"$OUT/$tag.txt" 2>&1
      tail -n 60 "$OUT/$tag.txt" ;;
    e2e_gpt2:1k | e2e_gpt2:8k | e2e_gpt2:1k:compile | e2e_gpt2:8k:compile)
      IFS=: read -r _ shape compiled <<<"$job"
      compile=off tag=e2e_gpt2_$shape
      [[ -n $compiled ]] && compile=on tag=e2e_gpt2_${shape}_compiled
      run_timed "$job" "$budget" python scripts/e2e_throughput.py --out "$OUT/$tag" --shapes "gpt2_$shape" \
        --attention dense masked flash --compile $compile --seconds 15 >"$OUT/$tag.txt" 2>&1
      tail -n 15 "$OUT/$tag.txt" ;;
    e2e_epilogue | e2e_epilogue:compile)
      compile=off tag=e2e_epilogue
      [[ $job == *:compile ]] && compile=on tag=e2e_epilogue_compiled
      run_timed "$job" "$budget" python scripts/e2e_throughput.py --out "$OUT/$tag" --shapes qwen3_1k \
        --attention dense masked --compile $compile --qk-epilogue fused unfused --seconds 15 >"$OUT/$tag.txt" 2>&1
      tail -n 15 "$OUT/$tag.txt" ;;
    bench_epilogue)
      run_timed "$job" "$budget" python scripts/bench_topk.py --epilogue-only --out "$OUT/bench_epilogue.json" \
        >"$OUT/bench_epilogue.txt" 2>&1
      tail -n 20 "$OUT/bench_epilogue.txt" ;;
    bench_decode | bench_decode:*)
      qheads=16
      [[ $job == *:* ]] && qheads=${job#*:}
      run_timed "$job" "$budget" python scripts/bench_decode.py --q-heads "$qheads" --batches 1,4,8,16 \
        --query-rows 1,4,8 --contexts 32768,131072 --out "$OUT/bench_decode_q$qheads.json" \
        >"$OUT/bench_decode_q$qheads.txt" 2>&1
      tail -n 25 "$OUT/bench_decode_q$qheads.txt" ;;
    bench_generate_points)
      run_timed "$job" "$budget" python scripts/bench_generate.py --models qwen3_0.6b --attentions dense,short,sfa \
        --batches 4 --contexts 32768 --compile-at 4:32768 --compile-attentions dense,short,sfa --hf-at 4:4096 \
        --out "$OUT/bench_generate_points.json" >"$OUT/bench_generate_points.txt" 2>&1
      tail -n 20 "$OUT/bench_generate_points.txt" ;;
    bench_generate_plan | bench_generate_plan:*)
      alternative=SPLIT_CAP=128,num_stages=3
      [[ $job == *:* ]] && alternative=${job#*:}
      for spec in "shipped sfa" "swept sfa,dense $alternative"; do
        read -r tag attentions plan <<<"$spec"
        too_late "bench_generate_plan $tag" && continue
        run_timed "bench_generate_plan $tag" "$budget" python scripts/bench_generate.py --models qwen3_0.6b \
          --attentions $attentions --batches 4 --contexts 32768 --modes compile --compile-at '' --hf-at '' \
          --decode-plan "${plan:-}" --out "$OUT/bench_generate_plan_$tag.json" \
          >"$OUT/bench_generate_plan_$tag.txt" 2>&1
        tail -n 6 "$OUT/bench_generate_plan_$tag.txt"
      done ;;
    *:*:*)
      IFS=: read -r family arm seed <<<"$job"
      line=$(bash scripts/quality_study.sh --list-arms | awk -v f="$family" -v a="$arm" '$1 == f && $2 == a')
      if [[ -z $line ]]; then summary+=("$job: no such arm in scripts/quality_study.sh --list-arms"); continue; fi
      read -r -a arm_overrides <<<"$(cut -d' ' -f3- <<<"$line")"
      dir=$RUNS/seed$seed/$family/$arm
      if python scripts/run_finished.py "$dir"; then summary+=("$(printf '%-40s finished before' "$job")"); continue; fi
      mkdir -p "$RUNS/logs"
      run_timed "$job" "$budget" python train.py "experiment=${STUDY}_$family" logging=disabled train.resume=auto \
        "root=$RUNS/root" "out_dir=$dir" "${corpus[@]}" train.seed="$seed" "${arm_overrides[@]}" \
        "${overrides[@]}" </dev/null >>"$RUNS/logs/seed$seed-$family-$arm.log" 2>&1
      tail -n 2 "$RUNS/logs/seed$seed-$family-$arm.log" ;;
    *) summary+=("$job: unknown job (see scripts/gpu_session.sh's header)") ;;
  esac
done

# Run dirs without checkpoints or prepared data: metrics, configs, logs.
no_weights=(--exclude='*.pt' --exclude='checkpoint*')
tar -czf "$OUT/runs.tgz" "${no_weights[@]}" --exclude="$RUNS/root" "$RUNS" 2>/dev/null
# One archive instead of many files and deep folders. Checkpoints and prepared data (root/) are not packed and are
# deleted with the rest: the run dirs that need them for a resume live under $RUNS, not $OUT.
if [[ ${PACK_OUT:-0} == 1 ]]; then
  (cd "$OUT" &&
    find . -mindepth 1 -maxdepth 1 ! -name runs.tgz ! -name results.tgz ! -name .packed -printf './%P\n' >.packed &&
    tar -czf results.tgz "${no_weights[@]}" --exclude='root' -T .packed &&
    xargs -d '\n' rm -rf -- <.packed && rm -f .packed) || summary+=("PACK_OUT: packing failed, $OUT left as it was")
fi
echo "== gpu_session.sh: commit $GIT_COMMIT, $(($(date +%s) - start)) s of $DEADLINE_S"
printf '%s\n' "${summary[@]}"
