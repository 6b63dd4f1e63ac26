#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the four pipeline stages in order on the embedded synthetic default,
# into runs/demo/, ending with stage 4's summary table. The embedded data are synthetic: the numbers this
# prints are not the paper's.
set -euo pipefail
cd "$(dirname "$0")/.."
# With no GPU to run it, the demo skips compiling the CUDA kernel, about 2 of its minutes; scripts/test.sh compiles it.
if ! nvidia-smi -L > /dev/null 2>&1; then
  export NGD_NO_CUDA=${NGD_NO_CUDA:-1}
fi
bash scripts/setup.sh
# Stage 3 runs twice: a B0 student that serves as the logit-KD teacher, then the full B3 student.
steps=(
  "stage1_teacher.py"
  "stage2_prototypes.py"
  "stage3_student.py --variant B0 --name kd_teacher"
  "stage3_student.py --variant B3 --kd-teacher runs/demo/stage3/kd_teacher/best.pt"
  "stage4_eval.py"
)
for step in "${steps[@]}"; do
  echo "== $step"
  # shellcheck disable=SC2086  # the step's arguments are meant to split
  .venv/bin/python $step
done
