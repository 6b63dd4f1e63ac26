"""Inputs for the Proto-KD + D-Geo tests, and the comparisons the tests share."""

import torch

from ngd_ext import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_case(batch=64, dim=32, num_protos=25, num_classes=8, dtype=torch.float32, device="cpu", seed=0,
              labels=None, positive=(1, 2), sparse_target=False, scale=1.0):
    """Random inputs of the op's shapes. labels: explicit labels, or None for uniform random ones."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=generator, dtype=torch.float64) * scale
    protos = torch.randn(num_protos, dim, generator=generator, dtype=torch.float64)
    logits = torch.randn(num_classes, num_protos, generator=generator, dtype=torch.float64) * 2
    if sparse_target:
        logits[torch.rand(num_classes, num_protos, generator=generator) < 0.5] = -float("inf")
        logits[:, 0] = 0.0  # no row may be all zeros
    target = torch.softmax(logits, dim=1)
    if labels is None:
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
    else:
        labels = torch.as_tensor(labels, dtype=torch.int64)
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[[c for c in positive if c < num_classes]] = True
    return dict(z=z.to(device=device, dtype=dtype), protos=protos.to(device), target=target.to(device),
                labels=labels.to(device), positive=mask.to(device))


def weighted_grad(loss_fn, case, weights=(0.7, -1.3, 2.1), **kwargs):
    """The three losses, and the gradient of a weighted sum of them (so that each term is tested)."""
    z = case["z"].detach().clone().requires_grad_(True)
    losses = loss_fn(z, case["protos"], case["target"], case["labels"], case["positive"], **kwargs)
    total = sum(w * loss for w, loss in zip(weights, losses))
    (grad,) = torch.autograd.grad(total, z)
    return [loss.detach() for loss in losses], grad


def kink_free_params(case, tau=0.9):
    """var_cap and margin at least 1e-2 away from every class variance and pair distance, leaving some hinge
    terms active and some not, so that finite differences never cross a kink."""
    unit = torch.nn.functional.normalize(case["z"].double(), dim=1, eps=reference.NORM_EPS)
    num_classes = case["target"].shape[0]
    labels = case["labels"]
    means, variances = [], []
    for c in range(num_classes):
        members = unit[labels == c]
        if len(members):
            mean = members.mean(0)
            means.append(mean)
            variances.append(((members - mean) ** 2).sum(1).mean().item())
    distances = sorted(torch.cdist(torch.stack(means), torch.stack(means))[
        torch.ones(len(means), len(means), dtype=torch.bool).triu(1)].tolist())

    def between(values, offset):
        values = sorted(values)
        gaps = [(b - a, (a + b) / 2) for a, b in zip(values, values[1:]) if b - a > 2e-2]
        return max(gaps)[1] if gaps else (values[0] + offset if values else 0.5)

    return dict(tau=tau, var_cap=between(variances, -0.05), margin=between(distances, 0.05))
