// csrc/cuda's kernels and host code, compiled for the CPU emulator in emulation.h and registered as
// torch.ops.ngd_ext_emulated.proto_dgeo_fwd / proto_dgeo_bwd (CPU tensors in, CPU tensors out); mma_tile, one
// tensor-core tile through the emulator's model or through the .cu's shuffles; and split_tf32, the .cu's split of
// float operands.
#include "emulation.h"

#include "../../csrc/cuda/proto_dgeo_cuda.cu"

namespace {

// One warp: c += a b for a row-major 16 x 8 a, 8 x 8 b and 16 x 8 c, each lane loading and storing its fragments as
// PTX lays them out for mma m16n8k8 (g = lane / 4, t = lane % 4), multiplied by the emulator's model of the tensor
// cores or by the .cu's mma_by_shuffles (its float64 path, and float's before sm_80).
template <typename T, bool kShuffles>
__global__ void mma_tile_kernel(const T* a, const T* b, T* c) {
  const int g = threadIdx.x / 4, t = threadIdx.x % 4;
  const T a_fragment[4] = {a[g * 8 + t], a[(g + 8) * 8 + t], a[g * 8 + t + 4], a[(g + 8) * 8 + t + 4]};
  const T b_fragment[2] = {b[t * 8 + g], b[(t + 4) * 8 + g]};
  T c_fragment[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  if constexpr (kShuffles) {
    ngd_ext::mma_by_shuffles(c_fragment, a_fragment, b_fragment);
  } else {
    ngd_ext::mma_m16n8k8(c_fragment, a_fragment, b_fragment);
  }
  c[g * 8 + 2 * t] = c_fragment[0];
  c[g * 8 + 2 * t + 1] = c_fragment[1];
  c[(g + 8) * 8 + 2 * t] = c_fragment[2];
  c[(g + 8) * 8 + 2 * t + 1] = c_fragment[3];
}

// c + a b through mma_tile_kernel, in a's dtype (float64 or float32).
at::Tensor mma_tile(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool shuffles) {
  auto out = c.clone();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mma_tile", [&] {
    const auto kernel = shuffles ? mma_tile_kernel<scalar_t, true> : mma_tile_kernel<scalar_t, false>;
    ngd_emulation::launch(kernel, 1, 32, 0, nullptr, a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                          out.data_ptr<scalar_t>());
  });
  return out;
}

// [hi, lo] of the .cu's split_tf32 of every element of a float tensor.
at::Tensor split_tf32(const at::Tensor& in) {
  const auto x = in.contiguous();
  const int64_t n = x.numel();
  auto out = at::empty({2, n}, x.options());
  const float* values = x.data_ptr<float>();
  float* hi = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) ngd_ext::split_tf32(values[i], hi[i], hi[n + i]);
  return out;
}

// Whether the emulated kernels behave as compiled for the emulated GPU (emulation.h's kernel_images_present).
void set_kernel_images_present(bool present) { ngd_emulation::kernel_images_present() = present; }

// The row kernel's most blocks (emulation.h's row_block_limit; 0: the .cu's own).
void set_row_block_limit(int64_t limit) { ngd_emulation::row_block_limit() = limit; }

}  // namespace

TORCH_LIBRARY(ngd_ext_emulated, m) {
  m.def("proto_dgeo_fwd", &ngd_ext::proto_dgeo_fwd_cuda);
  m.def("proto_dgeo_bwd", &ngd_ext::proto_dgeo_bwd_cuda);
  m.def("mma_tile", &mma_tile);
  m.def("split_tf32", &split_tf32);
  m.def("set_kernel_images_present", &set_kernel_images_present);
  m.def("set_row_block_limit", &set_row_block_limit);
}
