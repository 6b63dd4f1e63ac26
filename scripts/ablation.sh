#!/usr/bin/env bash
# The paper's ablation, B0 to B3, at three training seeds on the embedded synthetic default, then stage 4 with each
# preset's students as replicates: what each term did, with intervals over the seeds. Each seed's B0 is the KD
# teacher of its B1 to B3. The data are synthetic: the numbers are not the paper's.
#   bash scripts/ablation.sh [RUN_DIR]        (default runs/ablation; set up first: bash scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/ablation}
python=.venv/bin/python
$python stage1_teacher.py --run-dir "$run"
$python stage2_prototypes.py --run-dir "$run"
for seed in 0 1 2; do
  $python stage3_student.py --run-dir "$run" --variant B0 --name "B0_seed$seed" --seed "$seed"
  for variant in B1 B2 B3; do
    $python stage3_student.py --run-dir "$run" --variant "$variant" --name "${variant}_seed$seed" --seed "$seed" \
        --kd-teacher "$run/stage3/B0_seed$seed/best.pt"
  done
done
replicates=()
for variant in B0 B1 B2 B3; do
  replicates+=(--replicates "$variant=${variant}_seed0,${variant}_seed1,${variant}_seed2")
done
$python stage4_eval.py --run-dir "$run" --reference B0_seed0 "${replicates[@]}"
