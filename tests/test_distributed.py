"""ngd_ext.runtime.gather_rows: the fused loss over the global batch under DDP, as the README shows it, on two
gloo processes against one process."""

import pytest
import torch

import ngd_ext
from helpers import run_under_gloo
from ngd_ext.runtime import gather_rows

BATCH, FEATURES, EMBEDDING, CLASSES, PROTOS = 24, 10, 6, 8, 25


def problem():
    """A linear embedding network, a batch and the loss constants; D-Geo's terms all act on this batch."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, EMBEDDING)
    inputs = torch.randn(BATCH, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    protos = torch.randn(PROTOS, EMBEDDING, generator=generator)
    target = torch.softmax(torch.randn(CLASSES, PROTOS, generator=generator), dim=1)
    positive = torch.arange(CLASSES) % 3 == 1
    return model, inputs, labels, (protos, target), positive


def loss(z, labels, constants, positive):
    proto_kd, var_cap_loss, margin_loss = ngd_ext.proto_dgeo_loss(z, *constants, labels, positive, var_cap=0.05,
                                                                  margin=2.0)
    return proto_kd, var_cap_loss, margin_loss, proto_kd + var_cap_loss + margin_loss


def worker(rank, world):
    """One process: its share of the batch through DDP, the gathered embeddings and labels, the loss, backward."""
    model, inputs, labels, constants, positive = problem()
    trained = torch.nn.parallel.DistributedDataParallel(model)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # contiguous shares: rank order = batch order
    z, gathered_labels = gather_rows(trained(inputs[share])), gather_rows(labels[share])
    terms = loss(z, gathered_labels, constants, positive)
    terms[-1].backward()
    return {"labels": gathered_labels, "terms": torch.stack(terms).detach(),
            "grads": {name: p.grad for name, p in model.named_parameters()}}


def test_gathered_loss_and_gradient_are_the_one_process_ones(tmp_path):
    """Each process gathers its share's embeddings and labels: the labels come back whole and in rank order, the
    losses are those of the whole batch, and DDP's averaged gradient is the one-process gradient. Taken over each
    share alone, the D-Geo terms differ (checked here too, so that the test can tell the two apart)."""
    model, inputs, labels, constants, positive = problem()
    expected = loss(model(inputs), labels, constants, positive)
    expected[-1].backward()
    assert min(term.item() for term in expected[:3]) > 0.01  # every term acts
    halves = [loss(model(inputs[part]), labels[part], constants, positive)[2].item()
              for part in (slice(0, BATCH // 2), slice(BATCH // 2, None))]
    assert min(abs(half - expected[2].item()) for half in halves) > 0.01 * expected[2].item()

    for result in run_under_gloo(worker, tmp_path):
        assert torch.equal(result["labels"], labels)
        torch.testing.assert_close(result["terms"], torch.stack(expected).detach(), rtol=1e-5, atol=0)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("rows", [3, 1])
def test_one_process_group_gathers_its_own_rows(tmp_path, rows):
    """With a single process the gather is the identity, forward and backward."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        z = torch.randn(rows, 4, requires_grad=True)
        gathered = gather_rows(z)
        assert torch.equal(gathered, z)
        (gathered * torch.arange(4.0)).sum().backward()
        assert torch.equal(z.grad, torch.arange(4.0).expand(rows, 4))
    finally:
        torch.distributed.destroy_process_group()
