#!/usr/bin/env bash
# Wheels for a GPU machine that has torch + triton but no network and no hydra-core (as the lent H100/H200s):
# downloads them here into .whl/ (git-ignored) for Python 3.12 x86-64. On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# wandb and datasets are imported lazily and are not needed there (logging=disabled, prepared or embedded data).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 PyYAML==6.0.2
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as an sdist only: build its pure-Python wheel.
python -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl
ls .whl
