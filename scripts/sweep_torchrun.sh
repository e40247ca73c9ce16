#!/usr/bin/env bash
# Sweeps with several GPUs per job. Hydra's -m runs jobs inside one process, which cannot host torchrun's
# workers, so loop in the shell instead: one torchrun per combination, each in its own run directory.
#
#   NGPU=8 scripts/sweep_torchrun.sh experiment=gpt2_124m_owt logging=online
#   KS="4 8 16" KINDS="dense sfa" scripts/sweep_torchrun.sh train.max_steps=2000
#
# Extra arguments go to every job. Run names follow each job's config (docs/training.md) unless you pass run_name (then
# every job would share it: don't). Compare afterwards: python scripts/plot_runs.py workspace/runs/*
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
KINDS=${KINDS:-"dense sfa"}
KS=${KS:-"4 8 16"}

for kind in $KINDS; do
  # dense ignores k: run it once
  ks=$KS; [ "$kind" = sfa ] || ks=none
  for k in $ks; do
    args=(attention="$kind")
    [ "$k" = none ] || args+=(attention.k="$k")
    echo "== ${args[*]} $* =="
    torchrun --standalone --nproc_per_node="$NGPU" train.py "${args[@]}" "$@"
  done
done
