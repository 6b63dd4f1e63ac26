#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. Tests on a real GPU skip where none is present; the CUDA
# kernels still run, on the CPU, through tests/cuda_emulation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests "$@"
