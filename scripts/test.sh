#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. CUDA tests skip where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests "$@"
