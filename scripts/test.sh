#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. Tests on a real GPU skip where none is present; the CUDA
# kernels still run, on the CPU, through tests/cuda_emulation.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests' temporary folders reach about 1.6 GB at their peak, mostly ResNet checkpoints; on a fuller disk they
# would fail one by one, deep inside torch.save, instead of here.
temp_root=$("${PYTHON:-python3}" -c 'import tempfile; print(tempfile.gettempdir())')  # pytest's choice too
free_mb=$(df -Pm "$temp_root" | awk 'NR == 2 {print $4}')
if (( free_mb < 2048 )); then
  echo "scripts/test.sh: $temp_root has $free_mb MB free; the tests need about 2 GB there" \
       "(TMPDIR chooses another folder)" >&2
  exit 1
fi
bash scripts/setup.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# A worker per CPU (pytest-xdist), each test file on one worker, so that a file's fixtures are built once.
.venv/bin/python -m pytest -q -n auto --dist loadfile tests "$@"
