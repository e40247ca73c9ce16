#!/usr/bin/env bash
# DDP scaling check: the same training config on 1 GPU and on N GPUs (default 2), ~60 s each, then the
# steady-state tokens/s of both and the scaling efficiency. Offline (embedded corpus); needs torch + hydra-core.
#
#   scripts/ddp_scaling.sh                                  # gpt2_small, SFA k=8, 1 vs 2 GPUs, 60 s each
#   NGPU=4 SECONDS_PER_RUN=90 scripts/ddp_scaling.sh attention=dense train.compile=true
#
# Both runs use one global batch (train.batch_tokens), so 1 GPU accumulates NGPU micro-batches per step
# where N GPUs take one each: the optimisation is identical and only the throughput differs.
# Results: workspace/ddp_scaling/<timestamp>/{single,ddpN}/ (metrics.jsonl) and scaling.json beside them.
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-2}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-60}
MICRO_BATCH=${MICRO_BATCH:-16}
SEQ_LEN=${SEQ_LEN:-1024}
OUT=${OUT:-workspace/ddp_scaling/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

COMMON=(
  model=gpt2_small attention=sfa attention.k=8 data=embedded logging=disabled
  train.seq_len="$SEQ_LEN" train.micro_batch="$MICRO_BATCH" train.batch_tokens=$((MICRO_BATCH * SEQ_LEN * NGPU))
  train.max_steps=1000000 train.time_limit_s="$SECONDS_PER_RUN" train.eval_every=0 train.eval_batches=2
  train.ckpt_every=0 train.keep_checkpoints=1 train.log_every=20 optim.warmup_steps=100
  "root=$OUT" "$@"
)

# Prepare the data once, outside the timed runs.
python -c "from data.prepare import ensure_prepared; ensure_prepared('embedded', 'gpt2', '$OUT/data')"

echo "== 1 GPU =="
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES_1:-0} python train.py "${COMMON[@]}" out_dir="$OUT/single"
echo "== $NGPU GPUs =="
torchrun --standalone --nproc_per_node="$NGPU" train.py "${COMMON[@]}" dist=ddp out_dir="$OUT/ddp${NGPU}"

python - "$OUT" "$NGPU" <<'PY'
import json, statistics, sys
from pathlib import Path

out, ngpu = Path(sys.argv[1]), int(sys.argv[2])

def steady_tokens_per_s(run):
    records = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records[len(records) // 5:] if "val_loss" not in r]  # skip warm-up, evals
    info = json.loads((out / run / "run_info.json").read_text())
    return statistics.median(speeds), len(records), info

one, steps1, info1 = steady_tokens_per_s("single")
many, stepsn, infon = steady_tokens_per_s(f"ddp{ngpu}")
result = {"device": info1["device"], "ngpu": ngpu, "tokens_per_s_1gpu": one, f"tokens_per_s_{ngpu}gpu": many,
          "speedup": many / one, "efficiency": many / one / ngpu, "steps": [steps1, stepsn],
          "grad_accum": [info1["grad_accum"], infon["grad_accum"]]}
(out / "scaling.json").write_text(json.dumps(result, indent=2))
print(f"device: {info1['device']}")
print(f"1 GPU      : {one:>12,.0f} tokens/s  ({steps1} steps, grad accumulation {info1['grad_accum']})")
print(f"{ngpu} GPUs     : {many:>12,.0f} tokens/s  ({stepsn} steps, grad accumulation {infon['grad_accum']})")
print(f"speedup {many / one:.2f}x, scaling efficiency {many / one / ngpu:.0%}  -> {out / 'scaling.json'}")
PY
