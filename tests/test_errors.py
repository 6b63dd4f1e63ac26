"""Bad input gets a ValueError that names the argument, from the fused op and from the reference alike."""

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
