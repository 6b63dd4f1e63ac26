#!/usr/bin/env bash
# The whole GPU verification of ngd_ext on a CUDA machine, with no network and whatever torch it has:
# build the extension in place, run the test suite (CUDA cases included), the CUDA benchmark, a per-kernel
# profile, Nsight Compute on the row kernels, compute-sanitizer memcheck and racecheck on a short run, then the
# torch.compile tests and last stage 3's GPU tests.
# Logs and JSON go to OUTDIR, and the figures to OUTDIR/summary.txt. 5 to 7 minutes on an H200 before the
# torch.compile tests were added.
# With a second argument, another checkout of this project (an earlier commit, carried along) is built too,
# and its fused op is timed back to back with this one's at the large sizes: about a minute more.
#
#   bash scripts/gpu_check.sh OUTDIR [BASELINE_CHECKOUT]
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [BASELINE_CHECKOUT]}
mkdir -p "$out"
out=$(realpath "$out")
baseline=${2:+$(realpath "$2")}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc) && export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")
fi

step() { echo "== $1 ($(date +%T))" | tee -a "$out/summary.txt"; }

step "machine"
{ nvidia-smi; echo "CUDA_HOME=${CUDA_HOME:-}"; "$python" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } > "$out/machine.txt" 2>&1
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
timeout 150 "$python" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_reference.py \
  -k "not baseline_cpu_variant and not address_sanitizer and not compile" > "$out/tests.log" 2>&1
echo "pytest exit $?" | tee -a "$out/summary.txt"
grep -E "passed|failed|error|FAILED" "$out/tests.log" | tail -n 15 | tee -a "$out/summary.txt"
timeout 60 "$python" -m pytest -q -p no:cacheprovider tests/test_errors.py > "$out/tests_errors.log" 2>&1
errors_rc=$?
echo "error-path pytest exit $errors_rc" | tee -a "$out/summary.txt"
tail -n 3 "$out/tests_errors.log" | tee -a "$out/summary.txt"
if [ "$errors_rc" -ge 128 ] && command -v cuda-gdb > /dev/null; then  # a crash: keep its native backtrace
  { command -v c++ g++; c++ --version | head -n 1; } > "$out/crash_backtrace.log" 2>&1
  timeout 60 cuda-gdb -batch -ex run -ex bt --args "$python" -m pytest -q -x -p no:cacheprovider tests/test_errors.py \
    >> "$out/crash_backtrace.log" 2>&1
fi

step "benchmark"
timeout 200 "$python" benchmarks/bench_proto_dgeo.py --device cuda --compile-dynamic --time-budget 130 \
  --out "$out/bench_cuda.json" > "$out/bench.log" 2>&1
echo "benchmark exit $?" | tee -a "$out/summary.txt"
sed -n '/^dtype /,$p' "$out/bench.log" | tee -a "$out/summary.txt"

if [ -n "$baseline" ]; then
  step "fused op of $baseline, then of this checkout"
  ab=(--device cuda --provider fused --batch 8192 65536 --dim 512 2048 --dtype float32 bfloat16)
  if (cd "$baseline" && "$python" setup.py build_ext --inplace) > "$out/baseline_build.log" 2>&1; then
    (cd "$baseline" && timeout 120 "$python" benchmarks/bench_proto_dgeo.py "${ab[@]}" --out "$out/ab_baseline.json") \
      > "$out/ab_baseline.log" 2>&1
    timeout 120 "$python" benchmarks/bench_proto_dgeo.py "${ab[@]}" --out "$out/ab_this.json" > "$out/ab_this.log" 2>&1
    for log in ab_baseline ab_this; do
      echo "-- $log" | tee -a "$out/summary.txt"
      sed -n '/^dtype /,$p' "$out/$log.log" | tee -a "$out/summary.txt"
    done
  else
    echo "baseline build failed:" | tee -a "$out/summary.txt"
    tail -n 20 "$out/baseline_build.log" | tee -a "$out/summary.txt"
  fi
fi

step "kernel profile"
timeout 90 "$python" scripts/kernel_profile.py --out "$out/kernel_profile.json" > "$out/kernel_profile.log" 2>&1
echo "kernel profile exit $?" | tee -a "$out/summary.txt"
grep -A 8 "^B=" "$out/kernel_profile.log" | tee -a "$out/summary.txt"

# Nsight Compute on the two row kernels at the largest shape: how close to the memory and compute roofs they
# run, their occupancy, and what their warps wait on.
step "ncu"
if command -v ncu > /dev/null; then
  # The first row-kernel launch is the benchmark helper's untimed forward: skip it, take a forward and a backward.
  profile_rows=(-k regex:"forward_rows_kernel|backward_kernel" --launch-skip 1 -c 2
                "$python" scripts/kernel_profile.py --batch 65536 --dim 2048 --steps 1 --plain)
  timeout 150 ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    --section ComputeWorkloadAnalysis --section SchedulerStats "${profile_rows[@]}" > "$out/ncu.log" 2>&1
  echo "ncu exit $?" | tee -a "$out/summary.txt"
  figures="Duration|Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issue Slots Busy"
  figures+="|Issued Warp|No Eligible|Eligible Warps|Executed Ipc A|stall|Stall"
  grep -E "^  void |$figures" "$out/ncu.log" | cut -c1-150 | tee -a "$out/summary.txt"
  # What the warps wait on, reason by reason (warps stalled per issued instruction, 0.05 and over).
  timeout 90 ncu --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" "${profile_rows[@]}" \
    > "$out/ncu_stalls.log" 2>&1
  echo "ncu stall reasons exit $?" | tee -a "$out/summary.txt"
  grep -E "^  void |issue_stalled" "$out/ncu_stalls.log" | awk '/^  void/ || $NF + 0 >= 0.05' | cut -c1-150 \
    | tee -a "$out/summary.txt"
else
  echo "no ncu on PATH" | tee -a "$out/summary.txt"
fi

step "compute-sanitizer"
for tool in memcheck racecheck; do
  timeout 60 compute-sanitizer --tool "$tool" "$python" scripts/gpu_smoke.py > "$out/sanitizer_$tool.log" 2>&1
  echo "$tool exit $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -n 1)" | tee -a "$out/summary.txt"
done
# Last, so that Inductor's compilations delay no measurement: torch.compile of the op on the
# GPU, its CUDA graphs under mode="reduce-overhead" included.
step "torch.compile tests"
timeout 120 "$python" -m pytest -q -p no:cacheprovider tests/test_fused.py -k "compile and cuda" \
  > "$out/tests_compile.log" 2>&1
echo "torch.compile pytest exit $?" | tee -a "$out/summary.txt"
grep -E "passed|skipped|failed|error|FAILED" "$out/tests_compile.log" | tail -n 5 | tee -a "$out/summary.txt"
# Stage 3's GPU path: its batched augmentation on the device against the CPU's, and the student trained under
# torchrun with SyncBatchNorm (NCCL), through the fused op's CUDA kernels.
step "stage 3 on the GPU"
timeout 150 "$python" -m pytest -q -p no:cacheprovider tests/test_stage3.py -k "gpu" > "$out/tests_stage3.log" 2>&1
echo "stage-3 pytest exit $?" | tee -a "$out/summary.txt"
grep -E "passed|skipped|failed|error|FAILED" "$out/tests_stage3.log" | tail -n 5 | tee -a "$out/summary.txt"
step "done"
