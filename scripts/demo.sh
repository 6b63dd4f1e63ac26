#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the four pipeline stages in order on the embedded synthetic default,
# into runs/demo/. The embedded data are synthetic: the numbers this prints are not the paper's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for stage in stage1_teacher.py stage2_prototypes.py stage3_student.py stage4_eval.py; do
  if [ ! -f "$stage" ]; then
    echo "== $stage: not written yet; the pipeline stops here"
    exit 0
  fi
  echo "== $stage"
  .venv/bin/python "$stage"
done
