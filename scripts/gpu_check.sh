#!/usr/bin/env bash
# The whole GPU verification of ngd_ext on a CUDA machine, with no network and whatever torch it has, within a time
# budget (GPU_CHECK_BUDGET seconds, default 450, build included). Steps run in order of what a GPU run must settle
# first: build the extension in place; the CUDA tests; the CUDA benchmark (the op's targets); the training benchmark
# at 224 px; compute-sanitizer
# memcheck and racecheck; stage 3's GPU tests; the torch.compile tests; then the diagnostics: the fused op timed
# against a baseline checkout, a per-kernel profile (the baseline's too), Nsight Compute on the row kernels. Each
# step's time limit is cut to what is left of the budget, and a step that no longer fits is skipped and named in the
# summary, so the run ends within the budget with every figure it reached written down. Run again into the same
# OUTDIR (on the same machine), it skips the steps that ended there before and goes on with the rest.
# Logs and JSON go to OUTDIR, and the figures to OUTDIR/summary.txt.
# With a second argument, another checkout of this project (an earlier commit, carried along) is built too,
# and its fused op is timed back to back with this one's at the large sizes: GPU machines differ from one loan to
# the next, and this compares two kernels on one.
#
#   bash scripts/gpu_check.sh OUTDIR [BASELINE_CHECKOUT]
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [BASELINE_CHECKOUT]}
mkdir -p "$out"
out=$(realpath "$out")
baseline=${2:+$(realpath "$2")}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-450}
export PYTHONUNBUFFERED=1 FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step() { echo "== $1 ($(date +%T), $SECONDS s in)" | tee -a "$out/summary.txt"; }
note() { echo "$@" | tee -a "$out/summary.txt"; }
skipped=()
mkdir -p "$out/.done"

# allow NAME LIMIT MINIMUM: sets $limit to the step's own LIMIT cut to what is left of the budget (less 10 s for
# the closing lines); fails when an earlier run into OUTDIR ended the step, and, naming the step as skipped, when
# less than its MINIMUM is left.
allow() {
  if [ -e "$out/.done/${1// /_}" ]; then
    note "$1: ended in an earlier run into $out"
    return 1
  fi
  local left=$((budget - SECONDS - 10))
  if [ "$left" -lt "$3" ]; then
    note "skipped: $1 needs at least $3 s, $((left > 0 ? left : 0)) s of the $budget s budget are left"
    skipped+=("$1")
    return 1
  fi
  limit=$(($2 < left ? $2 : left))
}

# ended NAME STATUS: notes a step's exit status, and marks the step ended unless its time limit cut it (124, 137).
ended() {
  note "$1 exit $2"
  if [ "$2" -ne 124 ] && [ "$2" -ne 137 ]; then touch "$out/.done/${1// /_}"; fi
}

step "machine"
{ nvidia-smi; command -v nvcc; "$python" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } > "$out/machine.txt" 2>&1
tail -n 2 "$out/machine.txt" | tee -a "$out/summary.txt"

step "build"
if ! "$python" setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log" | tee -a "$out/summary.txt"
  exit 1
fi
"$python" -c "import ngd_ext; print('fused cpu', ngd_ext.fused_available('cpu'), 'cuda', ngd_ext.fused_available('cuda'))" 2>&1 | tee -a "$out/summary.txt"

# Error-path tests run on their own: a crash there must not hide the numerical results. The reruns of the CPU
# tests on the baseline CPU kernels and under AddressSanitizer are left to CI, which runs them on every commit.
step "tests"
if allow "tests" 150 60; then
  timeout "$limit" "$python" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_reference.py \
    -k "not baseline_cpu_variant and not address_sanitizer and not compile" > "$out/tests.log" 2>&1
  ended "tests" $?
  grep -E "passed|failed|error|FAILED" "$out/tests.log" | tail -n 15 | tee -a "$out/summary.txt"
fi
if allow "error-path tests" 60 30; then
  timeout "$limit" "$python" -m pytest -q -p no:cacheprovider tests/test_errors.py > "$out/tests_errors.log" 2>&1
  errors_rc=$?
  ended "error-path tests" $errors_rc
  tail -n 3 "$out/tests_errors.log" | tee -a "$out/summary.txt"
  if [ "$errors_rc" -ge 128 ] && command -v cuda-gdb > /dev/null && allow "crash backtrace" 60 30; then
    { command -v c++ g++; c++ --version | head -n 1; } > "$out/crash_backtrace.log" 2>&1
    timeout "$limit" cuda-gdb -batch -ex run -ex bt --args "$python" -m pytest -q -x -p no:cacheprovider \
      tests/test_errors.py >> "$out/crash_backtrace.log" 2>&1
  fi
fi

# The benchmark starts no new configuration after its own --time-budget, and finishing the one under way (its
# torch.compile included) takes up to about a minute.
step "benchmark"
if allow "benchmark" 200 100; then
  timeout "$limit" "$python" benchmarks/bench_proto_dgeo.py --device cuda --compile-dynamic \
    --time-budget $((limit - 70)) --out "$out/bench_cuda.json" > "$out/bench.log" 2>&1
  ended "benchmark" $?
  sed -n '/^dtype /,$p' "$out/bench.log" | tee -a "$out/summary.txt"
fi

# Stage 3's training step at the paper's 224 px, bf16 and channels_last, eager and compiled, with the projected time
# of the paper's recipe (100 epochs of FERPlus) per configuration; B3's KD teacher a ResNet-50, as in the recipe.
step "training benchmark"
if allow "training benchmark" 240 120; then
  timeout "$limit" "$python" benchmarks/bench_training.py --device cuda --arch resnet18 resnet50 --size 224 \
    --batch 128 --teacher-arch resnet50 --compile --steps 20 --out "$out/bench_training_cuda.json" \
    > "$out/bench_training.log" 2>&1
  ended "training benchmark" $?
  sed -n '/^arch /,$p' "$out/bench_training.log" | tee -a "$out/summary.txt"
fi

step "compute-sanitizer"
for tool in memcheck racecheck; do
  if allow "compute-sanitizer $tool" 60 40; then
    timeout "$limit" compute-sanitizer --tool "$tool" "$python" scripts/gpu_smoke.py > "$out/sanitizer_$tool.log" 2>&1
    ended "compute-sanitizer $tool" $?
    grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -n 1 | tee -a "$out/summary.txt"
  fi
done

# Stage 3's GPU path: its batched augmentation on the device against the CPU's, the student trained under torchrun
# with SyncBatchNorm (NCCL) through the fused op's CUDA kernels, and two --deterministic runs that must end alike.
step "stage 3 on the GPU"
if allow "stage-3 GPU tests" 210 90; then
  timeout "$limit" "$python" -m pytest -q -p no:cacheprovider tests/test_stage3.py tests/test_stage3_runs.py -k "gpu" \
    > "$out/tests_stage3.log" 2>&1
  ended "stage-3 GPU tests" $?
  grep -E "passed|skipped|failed|error|FAILED" "$out/tests_stage3.log" | tail -n 5 | tee -a "$out/summary.txt"
fi

# torch.compile of the op on the GPU, its CUDA graphs under mode="reduce-overhead" included.
step "torch.compile tests"
if allow "torch.compile tests" 120 60; then
  timeout "$limit" "$python" -m pytest -q -p no:cacheprovider tests/test_fused.py -k "compile and cuda" \
    > "$out/tests_compile.log" 2>&1
  ended "torch.compile tests" $?
  grep -E "passed|skipped|failed|error|FAILED" "$out/tests_compile.log" | tail -n 5 | tee -a "$out/summary.txt"
fi

if [ -n "$baseline" ]; then
  step "fused op of $baseline, then of this checkout"
  if allow "baseline build" 150 90; then
    (cd "$baseline" && timeout "$limit" "$python" setup.py build_ext --inplace) > "$out/baseline_build.log" 2>&1
    build_rc=$?
    note "baseline build exit $build_rc"
    if [ "$build_rc" -eq 0 ]; then
      touch "$out/.done/baseline_build"
    else
      tail -n 20 "$out/baseline_build.log" | tee -a "$out/summary.txt"
    fi
  fi
  ab=(--device cuda --provider fused --batch 8192 65536 --dim 512 2048 --dtype float32 bfloat16)
  for log in ab_baseline ab_this; do
    if [ -e "$out/.done/baseline_build" ] && allow "$log timing" 90 40; then
      if [ "$log" = ab_baseline ]; then dir=$baseline; else dir=.; fi
      (cd "$dir" && timeout "$limit" "$python" benchmarks/bench_proto_dgeo.py "${ab[@]}" --out "$out/$log.json") \
        > "$out/$log.log" 2>&1
      ended "$log timing" $?
      sed -n '/^dtype /,$p' "$out/$log.log" | tee -a "$out/summary.txt"
    fi
  done
fi

# Kernel time alone, this checkout's and then the baseline's: at B = 8192 launches and the Python autograd path take
# most of a forward + backward, so the timings above hide how the kernels themselves compare there.
step "kernel profile"
for log in kernel_profile baseline_kernel_profile; do
  if [ $log = kernel_profile ]; then dir=.; elif [ -e "$out/.done/baseline_build" ]; then dir=$baseline; else break; fi
  if allow "${log//_/ }" 90 45; then
    if [ -e "$dir/scripts/kernel_profile.py" ]; then  # a baseline from before the benchmark's --profile
      profiler=(scripts/kernel_profile.py)
    else
      profiler=(benchmarks/bench_proto_dgeo.py --profile --batch 8192 65536 --dim 512 2048 --dtype float32)
    fi
    (cd "$dir" && timeout "$limit" "$python" "${profiler[@]}" --out "$out/$log.json") > "$out/$log.log" 2>&1
    ended "${log//_/ }" $?
    grep -A 8 "^B=" "$out/$log.log" | tee -a "$out/summary.txt"
  fi
done

# Nsight Compute on the two row kernels at the largest shape: how close to the memory and compute roofs they
# run, their occupancy, what their warps wait on, and the bytes they move to and from DRAM with the L2 hit rate: the
# forward re-reads each tile for the class sums and the backward reads each row twice, the second reads meant for L2.
step "ncu"
if ! command -v ncu > /dev/null; then
  note "no ncu on PATH"
elif allow "ncu" 150 90; then
  # The first row-kernel launch is the benchmark helper's untimed forward: skip it, take a forward and a backward.
  profile_rows=(-k regex:"forward_rows_kernel|backward_kernel" --launch-skip 1 -c 2
                "$python" benchmarks/bench_proto_dgeo.py --profile-plain --batch 65536 --dim 2048 --dtype float32
                --steps 1)
  timeout "$limit" ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    --section ComputeWorkloadAnalysis --section SchedulerStats --section MemoryWorkloadAnalysis \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum "${profile_rows[@]}" > "$out/ncu.log" 2>&1
  ended "ncu" $?
  figures="Duration|Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issue Slots Busy"
  figures+="|Issued Warp|No Eligible|Eligible Warps|Executed Ipc A|stall|Stall|Hit Rate|Mem Busy|dram__bytes"
  grep -E "^  void |$figures" "$out/ncu.log" | cut -c1-150 | tee -a "$out/summary.txt"
  # What the warps wait on, reason by reason (warps stalled per issued instruction, 0.05 and over).
  if allow "ncu stall reasons" 90 45; then
    timeout "$limit" ncu --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      "${profile_rows[@]}" > "$out/ncu_stalls.log" 2>&1
    ended "ncu stall reasons" $?
    grep -E "^  void |issue_stalled" "$out/ncu_stalls.log" | awk '/^  void/ || $NF + 0 >= 0.05' | cut -c1-150 \
      | tee -a "$out/summary.txt"
  fi
fi

step "done"
note "skipped for want of time: ${skipped[*]:-none}"
