// The op schemas, and the Python module whose import registers them.
#include <Python.h>

#include <torch/library.h>

#include "proto_dgeo.h"

namespace {

PyObject* cpu_kernel_variant(PyObject* /*module*/, PyObject* /*args*/) {
  return PyUnicode_FromString(ngd_ext::cpu_kernel_variant());
}

PyObject* cuda_kernel_limits(PyObject* /*module*/, PyObject* /*args*/) {
  return Py_BuildValue("(ii)", ngd_ext::kCudaMaxProtos, ngd_ext::kCudaMaxClasses);
}

PyMethodDef methods[] = {
    {"cpu_kernel_variant", cpu_kernel_variant, METH_NOARGS,
     "The CPU kernels' compiled variant in use: 'avx2+fma' or 'baseline' (NGD_CPU_BASELINE=1 forces it)."},
    {"cuda_kernel_limits", cuda_kernel_limits, METH_NOARGS,
     "(prototypes, classes): the most of each the CUDA kernels serve."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing ngd_ext._C registers the ops below; besides, the module only says which CPU variant runs and what
// the CUDA kernels serve.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

namespace ngd_ext {

TORCH_LIBRARY(ngd_ext, m) {
  // The losses, then what backward needs: cosines u.p^ (B x K), log-sum-exp of s / tau (B), row norms ||z||
  // (B), the variance-cap coefficient per class (C), class means (C x D) and the margin gradient of one
  // member of each class (C x D).
  m.def(
      "proto_dgeo_fwd(Tensor z, Tensor protos, Tensor target, Tensor labels, Tensor positive, float tau, "
      "float var_cap, float margin) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "proto_dgeo_bwd(Tensor grad_proto_kd, Tensor grad_var_cap, Tensor grad_margin, Tensor z, Tensor protos, "
      "Tensor target, Tensor labels, Tensor cosines, Tensor lse, Tensor norms, Tensor var_coef, Tensor class_mean, "
      "Tensor margin_coef, float tau) -> Tensor");
}

}  // namespace ngd_ext
