// Shared declarations of the fused Proto-KD + D-Geo op (SPEC section 4).
#pragma once

#include <ATen/core/Tensor.h>

namespace ngd_ext {

// F.normalize's floor on a norm, and the epsilon under the square root of a class distance.
constexpr double kNormEps = 1e-8;
constexpr double kDistEps = 1e-12;

// Checks that need no host synchronisation (shapes, dtypes, devices, sizes, scalars), on every device.
// Errors name the argument.
void check_forward_args(const at::Tensor& z, const at::Tensor& protos, const at::Tensor& target,
                        const at::Tensor& labels, const at::Tensor& positive, double tau, double var_cap,
                        double margin);

// Value checks for CPU inputs (they would need a host synchronisation on a GPU): labels in [0, C) and
// target rows that are distributions. Errors name the argument and the row.
void check_values_cpu(const at::Tensor& target, const at::Tensor& labels);

// The dtype of the losses and of everything saved for backward: float64 for float64 z, else float32.
at::ScalarType accumulate_dtype(const at::Tensor& z);

}  // namespace ngd_ext
