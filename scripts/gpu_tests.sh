#!/usr/bin/env bash
# Run the GPU-marked tests (bf16, larger shapes) on a CUDA machine; CPU CI runs the rest.
# Usage: scripts/gpu_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, triton; assert torch.cuda.is_available(), 'gpu_tests.sh needs CUDA'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
exec python -m pytest -m gpu -q tests/ "$@"
