"""The fused Proto-KD + D-Geo op: registrations (fake kernels, autograd) and the public entry point."""

import glob
import os
import warnings

import torch

from ngd_ext import reference

BUILD_HINT = "build it with `pip install -e .` in the project's folder (or `bash scripts/setup.sh`)"
try:
    from ngd_ext import _C  # noqa: F401  (importing it registers torch.ops.ngd_ext.*)
except ImportError as error:
    _C = None
    built = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.*"))
    why = f"is built but does not load ({error}; built for another torch?)" if built else "is not built"
    warnings.warn(f"ngd_ext's fused op {why}: proto_dgeo_loss runs the pure-PyTorch reference; {BUILD_HINT}",
                  stacklevel=2)


# Looked up once, so that proto_dgeo_loss traces under torch.compile(fullgraph=True).
_FUSED_DEVICE_TYPES = frozenset(
    device_type for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("ngd_ext::proto_dgeo_fwd", key))


# The most prototypes and classes the CUDA kernels serve (csrc/proto_dgeo.h); the CPU kernels have no such limit.
CUDA_MAX_PROTOS, CUDA_MAX_CLASSES = _C.cuda_kernel_limits() if _C is not None else (0, 0)


def fused_available(device_type: str) -> bool:
    """Whether the fused op serves tensors of this device type ('cpu', 'cuda', ...)."""
    return device_type in _FUSED_DEVICE_TYPES


def cuda_kernels_serve(num_protos: int, num_classes: int) -> bool:
    """Whether the CUDA kernels serve this many prototypes and classes (a 9 x 9 grid's 81 prototypes they do not)."""
    return num_protos <= CUDA_MAX_PROTOS and num_classes <= CUDA_MAX_CLASSES


def _beyond_cuda_kernels(z, protos, target):
    """Whether these are CUDA inputs, the CUDA kernels are built, and they do not serve the inputs' prototypes and
    classes. Inputs of the wrong rank are left to the op, whose checks name them."""
    return z.device.type == "cuda" and fused_available("cuda") and protos.dim() == 2 and target.dim() == 2 and (
        not cuda_kernels_serve(protos.shape[0], target.shape[0]))


def proto_dgeo_loss(z, protos, target, labels, positive, tau=0.9, var_cap=0.2, margin=0.5):
    """Return (proto_kd, var_cap_loss, margin_loss) of SPEC section 4; gradients flow to z only.

    Runs the fused op where it is built for z's device and the pure-PyTorch reference otherwise; both
    take and return the same things (see ngd_ext.reference.proto_dgeo_loss). The reference also serves what the
    fused kernels cannot: more prototypes or classes than the CUDA kernels hold (with a warning), forward-mode AD and
    torch.func transforms, and the backward under create_graph=True.
    """
    beyond_cuda = _beyond_cuda_kernels(z, protos, target)
    if beyond_cuda and not torch.compiler.is_compiling():
        warnings.warn(f"proto_dgeo_loss: the CUDA kernels serve at most {CUDA_MAX_PROTOS} prototypes and "
                      f"{CUDA_MAX_CLASSES} classes, and these inputs have K = {protos.shape[0]}, C = "
                      f"{target.shape[0]}: the pure-PyTorch reference runs instead (the same results, slower)",
                      stacklevel=2)
    if beyond_cuda or not fused_available(z.device.type) or _differentiated_by_transform(z, protos, target):
        return reference.proto_dgeo_loss(z, protos, target, labels, positive, tau, var_cap, margin)
    proto_kd, var_cap_loss, margin_loss, *_ = torch.ops.ngd_ext.proto_dgeo_fwd(
        z, protos, target, labels, positive, float(tau), float(var_cap), float(margin))
    return proto_kd, var_cap_loss, margin_loss


def _differentiated_by_transform(z, protos, target):
    """Whether the inputs are differentiated in a way the op's autograd registration does not serve: by forward mode
    (torch.autograd.forward_ad), whose tangents would be dropped without an error, or inside a torch.func transform
    (grad, jvp, hessian, ...), which torch.library's generated autograd.Function refuses (pytorch/pytorch#168393)."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the check; AOTAutograd differentiates compiled code
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return torch.autograd.forward_ad._current_level >= 0 or wrapped(z) or wrapped(protos) or wrapped(target)


def _accumulate_dtype(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


if _C is not None:

    @torch.library.register_fake("ngd_ext::proto_dgeo_fwd")
    def _(z, protos, target, labels, positive, tau, var_cap, margin):
        torch._check(z.dim() == 2 and protos.dim() == 2 and target.dim() == 2)
        dtype = _accumulate_dtype(z)
        batch, dim = z.shape
        num_classes, num_protos = target.shape
        scalar = z.new_empty((), dtype=dtype)
        return (scalar, scalar.clone(), scalar.clone(), z.new_empty((batch, num_protos), dtype=dtype),
                z.new_empty((batch,), dtype=dtype), z.new_empty((batch,), dtype=dtype),
                z.new_empty((num_classes,), dtype=dtype),
                z.new_empty((num_classes, dim), dtype=dtype), z.new_empty((num_classes, dim), dtype=dtype))

    @torch.library.register_fake("ngd_ext::proto_dgeo_bwd")
    def _(grad_proto_kd, grad_var_cap, grad_margin, z, protos, target, labels, cosines, lse, norms, var_coef,
          class_mean, margin_coef, tau):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        z, protos, target, labels, positive, tau, var_cap, margin = inputs
        reference.check_constants(protos, target)  # reached only where the call had grad mode on, so always
        saved = output[3:]  # cosines, lse, norms, var_coef, class_mean, margin_coef
        ctx.save_for_backward(z, protos, target, labels, positive, *saved)
        ctx.params = tau, var_cap, margin
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zero tensors for the six saved outputs, which take no gradient

    def _backward(ctx, grad_proto_kd, grad_var_cap, grad_margin, *_saved_grads):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        z, protos, target, labels, positive, *saved = ctx.saved_tensors  # each access unpacks all eleven anew
        grads = [z.new_zeros((), dtype=_accumulate_dtype(z)) if grad is None else grad
                 for grad in (grad_proto_kd, grad_var_cap, grad_margin)]
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must be differentiable itself, and the fused backward is not, so it
            # comes from the reference's graph, recomputed here (same math; higher orders at reference speed).
            terms = reference.proto_dgeo_terms(z, protos, target, labels, positive, *ctx.params)
            (grad_z,) = torch.autograd.grad(terms, z, grads, create_graph=True)
        else:
            grad_z = torch.ops.ngd_ext.proto_dgeo_bwd(*grads, z, protos, target, labels, *saved, ctx.params[0])
        return grad_z, None, None, None, None, None, None, None

    torch.library.register_autograd("ngd_ext::proto_dgeo_fwd", _backward, setup_context=_setup_context)
