# Sourced by setup.sh and gpu_check.sh: exports CUDA_HOME, the root of a CUDA toolkit, where it is unset and a
# toolkit is found. torch finds the toolkit through it, and the nvcc on PATH may be a wrapper script outside the
# root (torch would then take the wrong folder and fail to link -lcudart): a root must hold bin/nvcc and
# include/cuda_runtime.h.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_on_path=$(command -v nvcc || true)
  for root in /usr/local/cuda /opt/cuda ${nvcc_on_path:+"$(dirname "$(dirname "$(readlink -f "$nvcc_on_path")")")"}; do
    if [ -x "$root/bin/nvcc" ] && [ -f "$root/include/cuda_runtime.h" ]; then
      export CUDA_HOME=$root
      break
    fi
  done
fi
