#!/usr/bin/env bash
# Run the GPU-marked tests (bf16, larger shapes) on a CUDA machine; CPU CI runs the rest.
# Usage: scripts/gpu_tests.sh [pytest args; test paths limit the run, default tests/]
# The log (device, versions, commit, every test's result) is written to $GPU_TESTS_LOG (default
# workspace/gpu_tests.log): every kernel or dispatch change commits that log under docs/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
log=${GPU_TESTS_LOG:-workspace/gpu_tests.log}
mkdir -p "$(dirname "$log")"
{
  # GIT_COMMIT names the commit where the tree travels without .git (a copied working tree)
  echo "# scripts/gpu_tests.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) commit ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  python -c "import torch, triton; assert torch.cuda.is_available(), 'gpu_tests.sh needs CUDA'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
  paths=(tests/)
  for arg in "$@"; do [[ $arg == tests/* ]] && paths=(); done
  python -m pytest -m gpu -q -rA "${paths[@]}" "$@"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
