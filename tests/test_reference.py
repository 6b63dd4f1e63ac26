"""The pure-PyTorch reference against an independent, loop-based float64 reading of SPEC section 4."""

import math

import pytest
import torch

from helpers import kink_free_params, make_case
from ngd_ext import reference


def loop_losses(z, protos, target, labels, positive, tau, var_cap, margin):
    """SPEC section 4, one sample, class and pair at a time, in float64."""
    z, protos, target = z.double().tolist(), protos.double().tolist(), target.double().tolist()
    labels, positive = labels.tolist(), positive.tolist()

    def unit(v):
        length = max(math.sqrt(sum(x * x for x in v)), 1e-8)
        return [x / length for x in v]

    units = [unit(row) for row in z]
    unit_protos = [unit(p) for p in protos]
    proto_kd = 0.0
    for u, y in zip(units, labels):
        logits = [sum(a * b for a, b in zip(u, p)) / tau for p in unit_protos]
        top = max(logits)
        lse = top + math.log(sum(math.exp(s - top) for s in logits))
        proto_kd += sum(t * (math.log(t) - (s - lse)) for t, s in zip(target[y], logits) if t > 0)
    proto_kd /= len(units)

    means, variances = {}, {}
    for c in range(len(target)):
        members = [u for u, y in zip(units, labels) if y == c]
        if members:
            means[c] = [sum(col) / len(members) for col in zip(*members)]
            variances[c] = sum(sum((a - b) ** 2 for a, b in zip(u, means[c])) for u in members) / len(members)
    capped = [c for c in means if positive[c] and labels.count(c) >= 2]
    var_cap_loss = sum(max(variances[c] - var_cap, 0.0) ** 2 for c in capped) / len(capped) if capped else 0.0
    present = sorted(means)
    pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
    margin_loss = 0.0
    for a, b in pairs:
        distance = math.sqrt(sum((x - y) ** 2 for x, y in zip(means[a], means[b])) + 1e-12)
        margin_loss += max(margin - distance, 0.0) ** 2
    margin_loss = margin_loss / len(pairs) if pairs else 0.0
    return proto_kd, var_cap_loss, margin_loss


CASES = {
    "random": dict(batch=40, dim=6, num_protos=5, num_classes=4),
    "absent_class": dict(batch=12, dim=5, num_protos=7, num_classes=5, labels=[0, 1, 1, 3, 3, 3, 0, 1, 4, 4, 0, 1]),
    "singletons": dict(batch=6, dim=4, num_protos=3, num_classes=6, labels=[0, 1, 2, 2, 4, 5]),
    "one_class": dict(batch=9, dim=5, num_protos=4, num_classes=3, labels=[1] * 9),
    "zeros_in_target": dict(batch=20, dim=6, num_protos=9, num_classes=4, sparse_target=True),
    "all_positive": dict(batch=30, dim=5, num_protos=4, num_classes=3, positive=(0, 1, 2)),
    "no_positive": dict(batch=30, dim=5, num_protos=4, num_classes=3, positive=()),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("tau,var_cap,margin", [(0.9, 0.2, 0.5), (0.05, 0.01, 2.0), (1.0, 0.6, 1.2)])
def test_reference_matches_loops(name, tau, var_cap, margin):
    case = make_case(dtype=torch.float64, seed=3, **CASES[name])
    got = reference.proto_dgeo_loss(**case, tau=tau, var_cap=var_cap, margin=margin)
    want = loop_losses(**case, tau=tau, var_cap=var_cap, margin=margin)
    for value, expected in zip(got, want):
        assert value.dtype == torch.float64
        assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_reference_terms_are_active_in_the_loop_cases():
    # The comparisons above would prove little if the hinge terms were all zero.
    case = make_case(dtype=torch.float64, seed=3, **CASES["random"])
    _, var_cap_loss, margin_loss = loop_losses(**case, tau=0.05, var_cap=0.01, margin=2.0)
    assert var_cap_loss > 1e-3 and margin_loss > 1e-3


def test_reference_returns_float32_for_half_inputs():
    case = make_case(dtype=torch.bfloat16, batch=16, dim=8)
    assert all(loss.dtype == torch.float32 for loss in reference.proto_dgeo_loss(**case))


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_gradcheck(seed):
    case = make_case(batch=14, dim=5, num_protos=6, num_classes=4, dtype=torch.float64, seed=seed,
                     positive=(0, 1, 2, 3))
    params = kink_free_params(case)
    z = case.pop("z").requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: reference.proto_dgeo_loss(x, **case, **params), (z,), eps=1e-6, atol=1e-7)
