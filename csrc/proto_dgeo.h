// Shared declarations of the fused Proto-KD + D-Geo op (SPEC section 4).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <type_traits>

namespace ngd_ext {

// F.normalize's floor on a norm, and the epsilon under the square root of a class distance.
constexpr double kNormEps = 1e-8;
constexpr double kDistEps = 1e-12;

// The most prototypes and classes the CUDA kernels serve: their tiles hold at most 64 prototypes, and the row kernel
// keeps per-warp class counts and sums of ||u||^2 in shared memory, 12 bytes per class and warp, 96 KiB at 1024
// classes beside 32 KiB (64 KiB in float64) of staged prototypes. Beyond them the CUDA op raises an error, and
// ngd_ext.proto_dgeo_loss runs the reference instead (ngd_ext._C.cuda_kernel_limits() gives it these numbers).
constexpr int kCudaMaxProtos = 64;
constexpr int kCudaMaxClasses = 1024;

// Numbers in error messages go through std::to_string and snprintf, never through an ostream: an extension
// built by a newer g++ than libtorch's can crash formatting a number through libtorch's locale (seen with
// g++ 13 and torch 2.11+cu130).
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
std::string text(T value) {
  return std::to_string(value);
}
std::string text(double value);
std::string text(at::IntArrayRef shape);

// Checks that need no host synchronisation (shapes, dtypes, devices, sizes, scalars), on every device.
// Errors name the argument.
void check_forward_args(const at::Tensor& z, const at::Tensor& protos, const at::Tensor& target,
                        const at::Tensor& labels, const at::Tensor& positive, double tau, double var_cap,
                        double margin);

// The same for the backward op, whose saved operands must have the shapes that the forward gave them. Autograd
// always passes them so; the checks serve a direct call of torch.ops.ngd_ext.proto_dgeo_bwd.
void check_backward_args(const at::Tensor& grad_proto_kd, const at::Tensor& grad_var_cap,
                         const at::Tensor& grad_margin, const at::Tensor& z, const at::Tensor& protos,
                         const at::Tensor& target, const at::Tensor& labels, const at::Tensor& cosines,
                         const at::Tensor& lses, const at::Tensor& norms, const at::Tensor& var_coef,
                         const at::Tensor& class_mean, const at::Tensor& margin_coef, double tau);

// Value checks for CPU inputs (they would need a host synchronisation on a GPU, where the kernels assert labels
// in range instead): labels in [0, C), and target rows that are distributions. Errors name the argument and the
// row; `op` opens the message. The backward indexes by label too, so it checks labels as well.
void check_labels_cpu(const char* op, const at::Tensor& labels, int64_t num_classes);
void check_values_cpu(const at::Tensor& target, const at::Tensor& labels);

// The dtype of the losses and of everything saved for backward: float64 for float64 z, else float32.
at::ScalarType accumulate_dtype(const at::Tensor& z);

// Which compiled variant of the CPU chunk math this process runs: "avx2+fma" on x86-64 processors that have
// both, else "baseline". NGD_CPU_BASELINE=1 in the environment forces the baseline, so that the tests can run
// it on any machine.
const char* cpu_kernel_variant();

}  // namespace ngd_ext
