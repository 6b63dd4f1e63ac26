# Sourced by setup.sh and gpu_check.sh, with $python the interpreter that builds ngd_ext. Exports, where unset:
#
# CUDA_HOME, the root of a CUDA toolkit, where one is found. torch finds the toolkit through it, and the nvcc on PATH
# may be a wrapper script outside the root (torch would then take the wrong folder and fail to link -lcudart): a
# root must hold bin/nvcc and include/cuda_runtime.h.
#
# TORCH_CUDA_ARCH_LIST, where a toolkit is found: the compute capabilities of the GPUs present, as torch sees them,
# so that the kernels run on them (a build for another architecture alone fails at the first launch, "no kernel image
# is available"); with no GPU, 9.0 (Hopper) alone, so that the CUDA code is still compiled and checked in about a
# minute, where torch's own default would compile it for every architecture it supports.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_on_path=$(command -v nvcc || true)
  for root in /usr/local/cuda /opt/cuda ${nvcc_on_path:+"$(dirname "$(dirname "$(readlink -f "$nvcc_on_path")")")"}; do
    if [ -x "$root/bin/nvcc" ] && [ -f "$root/include/cuda_runtime.h" ]; then
      export CUDA_HOME=$root
      break
    fi
  done
fi
if [ -n "${CUDA_HOME:-}" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$python" -c 'import torch
print(";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))' \
    2> /dev/null || true)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
