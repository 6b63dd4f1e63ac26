"""A short CUDA run of the fused op over the kernel's code paths, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/gpu_smoke.py
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from helpers import make_case, off_vector_boundary, weighted_grad  # noqa: E402

import ngd_ext  # noqa: E402

CASES = [  # batch, dim, prototypes, classes, dtype, rows on 16-byte boundaries: tile shapes (K <= 32 and K <= 64),
    # class sums in shared and in global memory, vector and element-by-element reads of z
    (1000, 130, 25, 8, torch.float32, True),  # class sums and offsets, vector tails, a partial last tile
    (9000, 64, 25, 8, torch.float32, True),  # several tiles per block in both kernels, one prototype chunk for all
    (300, 2048, 64, 64, torch.float32, True),
    (257, 64, 25, 8, torch.bfloat16, True),
    (129, 96, 40, 5, torch.float64, True),
    (70, 64, 25, 8, torch.float32, False),  # rows off the vector boundary, read element by element
]

for batch, dim, num_protos, num_classes, dtype, aligned in CASES:
    case = make_case(batch, dim, num_protos, num_classes, dtype=dtype, device="cuda", seed=batch)
    if not aligned:
        case["z"] = off_vector_boundary(case["z"])
    losses, grad = weighted_grad(ngd_ext.proto_dgeo_loss, case)
    torch.cuda.synchronize()
    finite = all(torch.isfinite(x).all().item() for x in (*losses, grad))
    print(f"B={batch} D={dim} K={num_protos} C={num_classes} {dtype} aligned={aligned}: losses "
          f"{[round(x.item(), 6) for x in losses]}, all finite: {finite}")
