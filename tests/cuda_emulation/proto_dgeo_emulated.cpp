// csrc/cuda's kernels and host code, compiled for the CPU emulator in emulation.h and registered as
// torch.ops.ngd_ext_emulated.proto_dgeo_fwd / proto_dgeo_bwd (CPU tensors in, CPU tensors out).
#include "emulation.h"

#include "../../csrc/cuda/proto_dgeo_cuda.cu"

TORCH_LIBRARY(ngd_ext_emulated, m) {
  m.def("proto_dgeo_fwd", &ngd_ext::proto_dgeo_fwd_cuda);
  m.def("proto_dgeo_bwd", &ngd_ext::proto_dgeo_bwd_cuda);
}
