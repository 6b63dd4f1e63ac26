#!/usr/bin/env bash
# Creates .venv with the pinned packages and builds ngd_ext's C++ extension: the CPU kernel always, the CUDA
# kernel too wherever a CUDA toolkit is found (GPU or not). Safe to rerun: it rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
.venv/bin/python -c "import ngd_ext; served = [d for d in ('cpu', 'cuda') if ngd_ext.fused_available(d)]
print('ngd_ext fused op serves:', ', '.join(served) or 'nothing (reference only)')"
