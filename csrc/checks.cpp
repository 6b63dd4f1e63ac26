// Argument checks shared by the CPU and CUDA kernels, and the number formatting of their messages.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdio>

#include "proto_dgeo.h"

namespace ngd_ext {

std::string text(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.6g", value);
  return buffer;
}

std::string text(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

namespace {

bool is_supported_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

void check_same_device(const char* op, const at::Tensor& z, const at::Tensor& other, const char* name) {
  TORCH_CHECK_VALUE(other.device() == z.device(), op, ": ", name, " is on ", other.device().str(), " but z is on ",
                    z.device().str(), "; all inputs must be on one device");
}

// z, protos, target and labels, which forward and backward both take. `op` opens every message.
void check_batch_args(const char* op, const at::Tensor& z, const at::Tensor& protos, const at::Tensor& target,
                      const at::Tensor& labels) {
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": z must be 2-D (B x D), got shape ", text(z.sizes()));
  TORCH_CHECK_VALUE(is_supported_float(z.scalar_type()), op,
                    ": z must be float32, float64, bfloat16 or float16, got ", z.scalar_type());
  TORCH_CHECK_VALUE(z.size(0) >= 1, op, ": z is empty (B = 0); the loss of an empty batch is undefined");
  TORCH_CHECK_VALUE(z.size(1) >= 1, op, ": z has no features (D = 0)");

  TORCH_CHECK_VALUE(protos.dim() == 2 && protos.size(1) == z.size(1) && protos.size(0) >= 1, op,
                    ": protos must be K x D with K >= 1 and D = ", text(z.size(1)), " (z's width), got shape ",
                    text(protos.sizes()));
  TORCH_CHECK_VALUE(is_supported_float(protos.scalar_type()), op, ": protos must be floating point, got ",
                    protos.scalar_type());

  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(1) == protos.size(0) && target.size(0) >= 1, op,
                    ": target must be C x K with C >= 1 and K = ", text(protos.size(0)),
                    " (the number of prototypes), got shape ", text(target.sizes()));
  TORCH_CHECK_VALUE(is_supported_float(target.scalar_type()), op, ": target must be floating point, got ",
                    target.scalar_type());

  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == z.size(0), op, ": labels must be 1-D of length B = ",
                    text(z.size(0)), ", got shape ", text(labels.sizes()));
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());

  check_same_device(op, z, protos, "protos");
  check_same_device(op, z, target, "target");
  check_same_device(op, z, labels, "labels");
}

void check_tau(const char* op, double tau) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, op, ": tau must be a positive finite number, got ", text(tau));
}

// A floating-point tensor of the given shape on z's device: a gradient or one of the forward's saved outputs.
void check_backward_operand(const at::Tensor& z, const at::Tensor& tensor, const char* name,
                            at::IntArrayRef shape, const char* meaning) {
  constexpr const char* op = "proto_dgeo_bwd";
  TORCH_CHECK_VALUE(tensor.sizes() == shape, op, ": ", name, " must have shape ", text(shape), " (", meaning,
                    "), got ", text(tensor.sizes()));
  TORCH_CHECK_VALUE(is_supported_float(tensor.scalar_type()), op, ": ", name, " must be floating point, got ",
                    tensor.scalar_type());
  check_same_device(op, z, tensor, name);
}

}  // namespace

void check_forward_args(const at::Tensor& z, const at::Tensor& protos, const at::Tensor& target,
                        const at::Tensor& labels, const at::Tensor& positive, double tau, double var_cap,
                        double margin) {
  constexpr const char* op = "proto_dgeo_loss";
  check_batch_args(op, z, protos, target, labels);
  TORCH_CHECK_VALUE(positive.dim() == 1 && positive.size(0) == target.size(0), op,
                    ": positive must be 1-D of length C = ", text(target.size(0)), ", got shape ",
                    text(positive.sizes()));
  TORCH_CHECK_VALUE(positive.scalar_type() == at::kBool, op, ": positive must be bool, got ", positive.scalar_type());
  check_same_device(op, z, positive, "positive");
  check_tau(op, tau);
  TORCH_CHECK_VALUE(std::isfinite(var_cap), op, ": var_cap must be finite, got ", text(var_cap));
  TORCH_CHECK_VALUE(std::isfinite(margin), op, ": margin must be finite, got ", text(margin));
}

void check_backward_args(const at::Tensor& grad_proto_kd, const at::Tensor& grad_var_cap,
                         const at::Tensor& grad_margin, const at::Tensor& z, const at::Tensor& protos,
                         const at::Tensor& target, const at::Tensor& labels, const at::Tensor& cosines,
                         const at::Tensor& lses, const at::Tensor& norms, const at::Tensor& var_coef,
                         const at::Tensor& class_mean, const at::Tensor& margin_coef, double tau) {
  check_batch_args("proto_dgeo_bwd", z, protos, target, labels);
  const int64_t batch = z.size(0), dim = z.size(1), num_protos = protos.size(0), num_classes = target.size(0);
  check_backward_operand(z, grad_proto_kd, "grad_proto_kd", {}, "a loss's gradient is a scalar");
  check_backward_operand(z, grad_var_cap, "grad_var_cap", {}, "a loss's gradient is a scalar");
  check_backward_operand(z, grad_margin, "grad_margin", {}, "a loss's gradient is a scalar");
  check_backward_operand(z, cosines, "cosines", {batch, num_protos}, "B x K, as proto_dgeo_fwd returns it");
  check_backward_operand(z, lses, "lse", {batch}, "B, as proto_dgeo_fwd returns it");
  check_backward_operand(z, norms, "norms", {batch}, "B, as proto_dgeo_fwd returns it");
  check_backward_operand(z, var_coef, "var_coef", {num_classes}, "C, as proto_dgeo_fwd returns it");
  check_backward_operand(z, class_mean, "class_mean", {num_classes, dim}, "C x D, as proto_dgeo_fwd returns it");
  check_backward_operand(z, margin_coef, "margin_coef", {num_classes, dim}, "C x D, as proto_dgeo_fwd returns it");
  check_tau("proto_dgeo_bwd", tau);
}

void check_labels_cpu(const char* op, const at::Tensor& labels, int64_t num_classes) {
  const auto label_values = labels.contiguous();
  const int64_t* label = label_values.data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.size(0); ++i) {
    TORCH_CHECK_VALUE(label[i] >= 0 && label[i] < num_classes, op, ": labels[", text(i), "] = ", text(label[i]),
                      " is out of range [0, ", text(num_classes), ")");
  }
}

void check_values_cpu(const at::Tensor& target, const at::Tensor& labels) {
  const int64_t num_classes = target.size(0);
  check_labels_cpu("proto_dgeo_loss", labels, num_classes);
  // A half-precision row of K entries sums to 1 only within its rounding.
  const bool half = target.scalar_type() == at::kHalf || target.scalar_type() == at::kBFloat16;
  const double tolerance = half ? 1e-2 : 1e-4;
  const auto rows = target.contiguous();
  const int64_t width = target.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "check_values_cpu", [&] {
    const scalar_t* value = rows.data_ptr<scalar_t>();
    for (int64_t c = 0; c < num_classes; ++c) {
      double sum = 0;
      for (int64_t k = 0; k < width; ++k) {
        const double entry = static_cast<double>(value[c * width + k]);
        TORCH_CHECK_VALUE(std::isfinite(entry) && entry >= 0, "proto_dgeo_loss: target[", text(c), ", ", text(k),
                          "] = ", text(entry),
                          "; target rows must be distributions (finite, non-negative, summing to 1)");
        sum += entry;
      }
      TORCH_CHECK_VALUE(std::abs(sum - 1.0) <= tolerance, "proto_dgeo_loss: target row ", text(c), " sums to ",
                        text(sum), "; target rows must be distributions (non-negative, summing to 1)");
    }
  });
}

at::ScalarType accumulate_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ngd_ext
