"""Where the stages run: bit-for-bit repeatable training on GPUs (--deterministic), the loss over the global batch
under DDP, and work spread over pools of threads (stage 4's image decoding) and of processes (stage 1's EEG).

Under DDP each process holds only its share of a batch, and Proto-KD's mean and D-Geo's class means, variances and
margins taken over that share differ from those of the whole batch (a share's class means lie further apart, and its
variances are noisier). gather_rows makes every process take the loss over the whole batch; DDP's average of the
parameter gradients is then that loss's gradient, as one process would compute it.
"""

import collections
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import torch
import torch.distributed as dist
from tqdm import tqdm

# Determinism --------------------------------------------------------------------------------------------------

def set_determinism(deterministic):
    """With deterministic=True every op must run a deterministic implementation, and one that has none raises,
    naming itself: a run then repeats bit for bit on the same machine and software. Otherwise cuDNN times its
    convolution algorithms once per input shape and keeps the fastest (the stages' shapes are fixed), which may
    differ run to run. The CPU ops the stages use, and the fused op on either device, are deterministic either way.
    Call it before the first CUDA operation: cuBLAS reads its workspace setting once."""
    if deterministic:
        # cuBLAS sums in a fixed order only with a fixed workspace per stream.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


# The loss over the global batch under DDP ----------------------------------------------------------------------

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


def gathered_order(batch, world):
    """The batch's rows in the order gather_rows returns them, when each process takes batch[rank::world]."""
    return torch.cat([batch[rank::world] for rank in range(world)])


def gather_rows(tensor):
    """The rows of `tensor` from every process of the default group, in rank order, with gradients flowing back to
    each process's own rows. Every process must pass the same number of rows, as a DistributedSampler gives them: the
    collective does not check, and NCCL may wait forever on a mismatch. Labels and other integer tensors gather too.

        z, labels = gather_rows(z), gather_rows(labels)
        proto_kd, var_cap_loss, margin_loss = ngd_ext.proto_dgeo_loss(z, protos, target, labels, positive)
    """
    return _GatherRows.apply(tensor)


# Pools of threads and of processes ----------------------------------------------------------------------------

def default_workers():
    """The CPUs this process may run on (a job scheduler's or taskset's share, not the whole machine), at most 8."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, usable)


def map_in_threads(function, items, desc, workers=None):
    """[function(item) for item in items] on a pool of threads, for work that releases the GIL (image decoding, face
    detection), in order, with a progress bar; the first exception stops the rest."""
    pool = ThreadPoolExecutor(workers or default_workers())
    try:
        return list(tqdm(pool.map(function, items), total=len(items), desc=desc, unit="image", leave=False))
    finally:
        pool.shutdown(cancel_futures=True)


def map_in_processes(function, items, workers):
    """function(item) for every item, in order, lazily: in this process with one worker, else in `workers` processes
    with at most two items each under way, so that a lazy `items` is read only as fast as the workers take it.
    function and the items must pickle."""
    if workers == 1:
        yield from map(function, items)
        return
    # spawn: the parent may hold threads (tqdm's monitor, OpenMP's pool) that a forked child would inherit locked.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        under_way = collections.deque()
        for item in items:
            under_way.append(pool.submit(function, item))
            if len(under_way) == 2 * workers:
                yield under_way.popleft().result()
        while under_way:
            yield under_way.popleft().result()
