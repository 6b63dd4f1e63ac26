"""csrc/cuda's kernels and host code, run on the CPU by the emulator in tests/cuda_emulation, against the
reference.

test_fused.py runs the real CUDA build where a GPU is present; these tests run everywhere and check the CUDA
code's logic: indexing, warp shuffles, block barriers, the per-block partial sums, the tile shapes, the host
code's grid arithmetic and its errors. They say nothing about speed, and cannot see races that only a GPU's
truly parallel threads would show (compute-sanitizer's racecheck in scripts/gpu_check.sh covers those).
"""

import os
import pathlib
import sys

import pytest
import torch
from torch.utils import cpp_extension

from helpers import EDGE_CASES, compare_exact_dtype, compare_half_dtype, make_case, weighted_grad

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the emulator's fibers use glibc's ucontext")


@pytest.fixture(scope="module", autouse=True)
def emulated_ops():
    """Builds (once; ninja rebuilds when the .cu or the emulator changes) and loads the emulated ops and the
    emulator's own test kernels."""
    build = ROOT / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        # cpp_extension finds ninja on PATH; the venv's bin folder is not on it when the venv is not activated.
        patch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        cpp_extension.load(
            name="ngd_ext_cuda_emulated",
            sources=[str(ROOT / "tests" / "cuda_emulation" / "proto_dgeo_emulated.cpp"),
                     str(ROOT / "tests" / "cuda_emulation" / "emulator_selftest.cpp"),
                     str(ROOT / "csrc" / "checks.cpp")],
            extra_cflags=["-O2"],
            build_directory=str(build),
            is_python_module=False,
        )


class EmulatedLoss(torch.autograd.Function):
    """The emulated forward and backward ops joined as autograd would join the real ones (ngd_ext/ops.py)."""

    @staticmethod
    def forward(ctx, z, protos, target, labels, positive, tau, var_cap, margin):
        outputs = torch.ops.ngd_ext_emulated.proto_dgeo_fwd(z, protos, target, labels, positive, tau, var_cap, margin)
        ctx.save_for_backward(z, protos, target, labels, *outputs[3:])
        ctx.tau = tau
        return outputs[:3]

    @staticmethod
    def backward(ctx, grad_proto_kd, grad_var_cap, grad_margin):
        grad_z = torch.ops.ngd_ext_emulated.proto_dgeo_bwd(grad_proto_kd, grad_var_cap, grad_margin,
                                                           *ctx.saved_tensors, ctx.tau)
        return grad_z, None, None, None, None, None, None, None


def emulated_loss(z, protos, target, labels, positive, tau, var_cap, margin):
    return EmulatedLoss.apply(z, protos, target, labels, positive, tau, var_cap, margin)


PARAMS = dict(tau=0.9, var_cap=0.1, margin=1.2)

SHAPES = [  # batch, dim, prototypes, classes: each tile shape, class sums in shared memory or not, odd sizes
    (1, 1, 25, 8),
    (7, 3, 25, 8),
    (100, 130, 25, 8),  # 4 blocks of 4-row warps (K <= 32), rows read element by element (D % 4 != 0)
    (70, 130, 33, 5),  # 2-row warps over 64 prototype slots, two prototype chunks
    (90, 64, 64, 64),  # 64 prototype slots, 64 classes
    (129, 40, 1, 3),
    (40, 400, 25, 64),  # class sums (100 KiB and more) past shared memory: in place in the output; float64:
                        # prototypes in two chunks of at most 256 columns
    (100, 1100, 25, 8),  # float32: two chunks of at most 1024 columns, the last step past D
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(dtype, shape):
    batch, dim, num_protos, num_classes = shape
    case = make_case(batch, dim, num_protos, num_classes, dtype=dtype, seed=batch + dim)
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(100, 130, 25, 8), (64, 128, 33, 8)], ids=lambda s: "x".join(map(str, s)))
def test_half_precision(dtype, shape):
    compare_half_dtype(emulated_loss, make_case(*shape, dtype=dtype, seed=1), **PARAMS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vector_and_element_access_give_the_same_bits(dtype):
    """Rows that start off a vector boundary are read element by element, in the same arithmetic order."""
    case = make_case(70, 64, 25, 8, dtype=dtype, seed=7)
    aligned = weighted_grad(emulated_loss, case, **PARAMS)
    shifted = torch.empty(case["z"].numel() + 1, dtype=dtype)[1:].view_as(case["z"]).copy_(case["z"])
    assert shifted.is_contiguous() and shifted.data_ptr() % 8 != 0
    torch.testing.assert_close(weighted_grad(emulated_loss, dict(case, z=shifted), **PARAMS), aligned, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases(name):
    options = dict(EDGE_CASES[name])
    labels = options.get("labels")
    case = make_case(len(labels) if labels else 120, 48, 25, 8, seed=11, **options)
    losses = compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)
    if name == "one_class":
        assert losses[2].item() == 0.0
    if name == "no_positive":
        assert losses[1].item() == 0.0


def test_zero_row():
    case = make_case(40, 16, 25, 8, dtype=torch.float64, seed=2)
    case["z"][3] = 0
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


def test_non_contiguous_z():
    case = make_case(96, 40, 25, 8, seed=4)
    case["z"] = torch.empty(40, 2 * 96).T[::2].copy_(case["z"])
    assert not case["z"].is_contiguous()
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


def test_several_tiles_per_block():
    """Past 264 x 8 rows (float64 takes one row per warp) a block of the row kernel loops over more than one
    tile, and stages each tile's two chunks of prototypes (at most 256 columns) anew."""
    case = make_case(2200, 300, 25, 8, dtype=torch.float64, seed=3)
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


def test_label_out_of_range_trips_the_device_assertion():
    case = make_case(20, 8, 25, 8, seed=5)
    case["labels"][7] = 8
    with pytest.raises(RuntimeError, match="device-side assertion failed.*label is out of range"):
        emulated_loss(*case.values(), **PARAMS)


def test_many_classes():
    """300 classes: 28 KiB of per-warp class statistics in shared memory, and class sums (117 KiB) added in place
    in the output."""
    case = make_case(40, 100, 25, 300, labels=[i % 20 for i in range(40)], seed=8)
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


def test_too_many_classes():
    case = make_case(10, 8, 25, 1025, seed=9)
    with pytest.raises(ValueError, match="at most 1024 classes, got target with C = 1025"):
        emulated_loss(*case.values(), **PARAMS)


def test_too_many_prototypes():
    case = make_case(10, 8, 65, 8, seed=6)
    with pytest.raises(ValueError, match="at most 64 prototypes, got protos with K = 65"):
        emulated_loss(*case.values(), **PARAMS)


# The emulator itself: it must reproduce a GPU's results where the CUDA code is right, and refuse code a GPU
# would run wrongly.

def test_emulator_warp_shuffles_add_in_butterfly_order():
    values = torch.randn(4 * 64, generator=torch.Generator().manual_seed(0))
    want = values.view(-1, 32).clone()
    for offset in (16, 8, 4, 2, 1):  # float32 additions in the kernel's order
        want = want + want[:, torch.arange(32) ^ offset]
    assert torch.equal(torch.ops.ngd_emulator_selftest.warp_sums(values), want[:, 0])


def test_emulator_block_barrier_orders_shared_memory():
    values = torch.arange(3 * 96, dtype=torch.float32)
    got = torch.ops.ngd_emulator_selftest.block_reverse(values, 96)
    assert torch.equal(got, values.view(3, 96).flip(1).reshape(-1))


def test_emulator_shared_memory_starts_as_nan():
    assert torch.isnan(torch.ops.ngd_emulator_selftest.read_unwritten_shared()).all()


def test_emulator_async_copies_land_at_the_wait():
    values = torch.arange(1, 33, dtype=torch.float32)
    before, after = torch.ops.ngd_emulator_selftest.async_copy(values)
    assert torch.isnan(before).all()
    assert torch.equal(after, torch.where(torch.arange(32) % 2 == 1, 0.0, values))


@pytest.mark.parametrize("kernel, message", [
    ("divergent_shuffle", "a shuffle reached by only part of a warp"),
    ("partial_barrier", r"__syncthreads\(\) reached by only part of the block"),
    ("oversized_shared", "asks for 65536 bytes of dynamic shared memory, more than 49152"),
])
def test_emulator_refuses_what_a_gpu_would_run_wrongly(kernel, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.ngd_emulator_selftest, kernel)()
