"""Bad input gets a ValueError that names the argument, from the fused op and from the reference alike, and from the
fused backward op when it is called directly."""

import pytest
import torch

from helpers import make_case
from ngd_ext import fused_available, reference


def fused(z, protos, target, labels, positive, tau=0.9, var_cap=0.2, margin=0.5):
    return torch.ops.ngd_ext.proto_dgeo_fwd(z, protos, target, labels, positive, tau, var_cap, margin)[:3]


IMPLEMENTATIONS = {"reference": reference.proto_dgeo_loss}
if fused_available("cpu"):
    IMPLEMENTATIONS["fused"] = fused


def with_row(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


BAD_INPUTS = {
    "z_1d": (lambda c: dict(c, z=c["z"][0]), r"z must be 2-D \(B x D\), got shape \[16\]"),
    "z_int": (lambda c: dict(c, z=c["z"].long()), r"z must be float32, float64, bfloat16 or float16"),
    "z_empty": (lambda c: dict(c, z=c["z"][:0], labels=c["labels"][:0]), r"z is empty \(B = 0\)"),
    "z_no_features": (lambda c: dict(c, z=c["z"][:, :0], protos=c["protos"][:, :0]), r"z has no features"),
    "z_nan": (lambda c: dict(c, z=with_row(c["z"], (3, 5), float("nan"))), r"z has a non-finite value in row 3"),
    "z_inf": (lambda c: dict(c, z=with_row(c["z"], (7, 0), float("inf"))), r"z has a non-finite value in row 7"),
    "protos_width": (lambda c: dict(c, protos=c["protos"][:, :-1]),
                     r"protos must be K x D with K >= 1 and D = 16 \(z's width\), got shape \[5, 15\]"),
    "target_width": (lambda c: dict(c, target=c["target"][:, :-1]),
                     r"target must be C x K with C >= 1 and K = 5 \(the number of prototypes\)"),
    "target_negative": (lambda c: dict(c, target=with_row(c["target"], (2, 1), -0.1)),
                        r"target\[2, 1\] = -0\.1.*distributions"),
    "target_sum": (lambda c: dict(c, target=c["target"] * 1.1), r"target row 0 sums to 1\.1"),
    "labels_dtype": (lambda c: dict(c, labels=c["labels"].int()), r"labels must be int64, got "),
    "labels_length": (lambda c: dict(c, labels=c["labels"][:-1]), r"labels must be 1-D of length B = 16"),
    "labels_range": (lambda c: dict(c, labels=with_row(c["labels"], 9, 4)),
                     r"labels\[9\] = 4 is out of range \[0, 4\)"),
    "labels_negative": (lambda c: dict(c, labels=with_row(c["labels"], 2, -1)),
                        r"labels\[2\] = -1 is out of range \[0, 4\)"),
    "protos_requires_grad": (lambda c: dict(c, protos=c["protos"].clone().requires_grad_(True)),
                             r"protos requires grad, but the loss gives a gradient with respect to z only; "
                             r"pass protos\.detach\(\)"),
    "target_requires_grad": (lambda c: dict(c, target=c["target"].clone().requires_grad_(True)),
                             r"target requires grad, .* pass target\.detach\(\)"),
    "positive_dtype": (lambda c: dict(c, positive=c["positive"].float()), r"positive must be bool"),
    "positive_length": (lambda c: dict(c, positive=c["positive"][:-1]), r"positive must be 1-D of length C = 4"),
    "tau_zero": (lambda c: dict(c, tau=0.0), r"tau must be a positive finite number, got 0"),
    "var_cap_nan": (lambda c: dict(c, var_cap=float("nan")), r"var_cap must be finite"),
    "margin_inf": (lambda c: dict(c, margin=float("inf")), r"margin must be finite"),
}


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_names_the_argument(implementation, name):
    mutate, message = BAD_INPUTS[name]
    case = mutate(make_case(batch=16, dim=16, num_protos=5, num_classes=4))
    with pytest.raises(ValueError, match=message):
        IMPLEMENTATIONS[implementation](**case)


BACKWARD_ARGS = ("grad_proto_kd", "grad_var_cap", "grad_margin", "z", "protos", "target", "labels", "cosines", "lse",
                 "norms", "var_coef", "class_mean", "margin_coef", "tau")

# The backward op's arguments as autograd passes them, changed one at a time as a direct call might get them wrong.
BAD_BACKWARD_INPUTS = {
    "grad_not_scalar": (lambda a: dict(a, grad_var_cap=a["grad_var_cap"].reshape(1)),
                        r"proto_dgeo_bwd: grad_var_cap must have shape \[\] \(a loss's gradient is a scalar\), "
                        r"got \[1\]"),
    "grad_int": (lambda a: dict(a, grad_margin=a["grad_margin"].long()), r"grad_margin must be floating point"),
    "z_rows": (lambda a: dict(a, z=a["z"][:-1]), r"proto_dgeo_bwd: labels must be 1-D of length B = 15"),
    "cosines_width": (lambda a: dict(a, cosines=a["cosines"][:, :-1]),
                      r"cosines must have shape \[16, 5\] \(B x K, as proto_dgeo_fwd returns it\), got \[16, 4\]"),
    "lse_length": (lambda a: dict(a, lse=a["lse"][:-2]), r"lse must have shape \[16\]"),
    "norms_2d": (lambda a: dict(a, norms=a["norms"][:, None]), r"norms must have shape \[16\]"),
    "var_coef_length": (lambda a: dict(a, var_coef=a["var_coef"][:-1]), r"var_coef must have shape \[4\]"),
    "class_mean_width": (lambda a: dict(a, class_mean=a["class_mean"][:, :-1]),
                         r"class_mean must have shape \[4, 16\] \(C x D"),
    "margin_coef_rows": (lambda a: dict(a, margin_coef=a["margin_coef"][:-1]),
                         r"margin_coef must have shape \[4, 16\]"),
    "labels_range": (lambda a: dict(a, labels=with_row(a["labels"], 9, 4)),
                     r"proto_dgeo_bwd: labels\[9\] = 4 is out of range \[0, 4\)"),
    "tau_negative": (lambda a: dict(a, tau=-1.0), r"proto_dgeo_bwd: tau must be a positive finite number, got -1"),
}


def backward_args(device="cpu"):
    """The backward op's arguments, by name, from a forward of a small case."""
    case = make_case(batch=16, dim=16, num_protos=5, num_classes=4, device=device)
    saved = torch.ops.ngd_ext.proto_dgeo_fwd(*case.values(), 0.9, 0.2, 0.5)[3:]
    grads = [torch.tensor(w, device=device) for w in (0.5, 1.0, 2.0)]
    inputs = [case[name] for name in ("z", "protos", "target", "labels")]
    return dict(zip(BACKWARD_ARGS, (*grads, *inputs, *saved, 0.9)))


@pytest.mark.skipif(not fused_available("cpu"), reason="ngd_ext._C is not built")
@pytest.mark.parametrize("name", sorted(BAD_BACKWARD_INPUTS))
def test_bad_backward_input_names_the_argument(name):
    mutate, message = BAD_BACKWARD_INPUTS[name]
    args = backward_args()
    torch.ops.ngd_ext.proto_dgeo_bwd(*args.values())  # unchanged, they pass
    with pytest.raises(ValueError, match=message):
        torch.ops.ngd_ext.proto_dgeo_bwd(*mutate(args).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["cosines", "class_mean", "grad_proto_kd"])
def test_backward_operand_on_another_device(name):
    args = backward_args("cuda")
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=rf"proto_dgeo_bwd: {name} is on cpu but z is on cuda:0"):
        torch.ops.ngd_ext.proto_dgeo_bwd(*args.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_inputs_on_two_devices(implementation):
    case = make_case(batch=16, dim=16, num_protos=5, num_classes=4, device="cuda")
    case["target"] = case["target"].cpu()
    with pytest.raises(ValueError, match=r"target is on cpu but z is on cuda:0"):
        IMPLEMENTATIONS[implementation](**case)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_bank_that_requires_grad_is_accepted_without_grad_mode(implementation):
    """Under no_grad nothing would be differentiated, so a learnable bank is not refused there (evaluation)."""
    case = make_case(batch=16, dim=16, num_protos=5, num_classes=4)
    want = IMPLEMENTATIONS[implementation](**case)
    with torch.no_grad():
        got = IMPLEMENTATIONS[implementation](**dict(case, protos=case["protos"].clone().requires_grad_(True)))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
