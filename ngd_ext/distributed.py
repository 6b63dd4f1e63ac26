"""The loss over the global batch under DDP: gathering every process's rows, differentiably.

Proto-KD's mean and D-Geo's class means, variances and margins are statistics of the batch. Under DDP each process
holds only its share of it, and the loss taken over that share differs from the loss of the whole batch (a share's
class means lie further apart, and its variances are noisier). Gathering the embeddings and labels first makes every
process take the loss over the whole batch; DDP's average of the parameter gradients is then that loss's gradient,
as one process would compute it.
"""

import torch
import torch.distributed as dist

# torch 2.14 renamed these collectives, and the old names now warn; the GPU machines' torch 2.11 has only those.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class _GatherRows(torch.autograd.Function):
    """All-gather along the first dimension; the backward hands each process the gradient of its own rows, summed over
    the processes (every process differentiates its own copy of the loss). torch.distributed.nn's all_gather does the
    same, and is deprecated."""

    @staticmethod
    def forward(ctx, tensor):
        gathered = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
        _ALL_GATHER_SINGLE(gathered, tensor.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad_gathered):
        grad = grad_gathered.new_empty((grad_gathered.shape[0] // dist.get_world_size(), *grad_gathered.shape[1:]))
        _REDUCE_SCATTER_SINGLE(grad, grad_gathered.contiguous(), op=dist.ReduceOp.SUM)
        return grad


def gather_rows(tensor):
    """The rows of `tensor` from every process of the default group, in rank order, with gradients flowing back to
    each process's own rows. Every process must pass the same number of rows, as a DistributedSampler gives them: the
    collective does not check, and NCCL may wait forever on a mismatch. Labels and other integer tensors gather too.

        z, labels = gather_rows(z), gather_rows(labels)
        proto_kd, var_cap_loss, margin_loss = ngd_ext.proto_dgeo_loss(z, protos, target, labels, positive)
    """
    return _GatherRows.apply(tensor)
