"""Bit-for-bit repeatable training on GPUs: the training stages' --deterministic flag."""

import os

import torch


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
