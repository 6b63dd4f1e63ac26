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

from helpers import (EDGE_CASES, NON_FINITE_Z, address_sanitizer_runtime, assert_float_accuracy,
                     assert_non_finite_z_gives_non_finite_loss,
                     compare_exact_dtype, compare_half_dtype, make_case, non_contiguous, off_vector_boundary,
                     weighted_grad)

ROOT = pathlib.Path(__file__).resolve().parent.parent

UNDER_ADDRESS_SANITIZER = os.environ.get("NGD_EMULATOR_ASAN") == "1"  # the run of test_cuda_emulated_asan.py
# Every schedule runs once: lockstep under AddressSanitizer (test_cuda_emulated_asan.py), where the compiler has its
# runtime, and the other two here.
SCHEDULES = (["lockstep"] if UNDER_ADDRESS_SANITIZER else
             ["in_order", "reversed"] if os.path.isabs(address_sanitizer_runtime()[0]) else
             ["lockstep", "in_order", "reversed"])

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the emulator's fibers use glibc's ucontext")


@pytest.fixture(scope="module", autouse=True)
def emulated_ops():
    """Builds (once; ninja rebuilds when the .cu or the emulator changes) and loads the emulated ops and the
    emulator's own test kernels. A GPU faults on an access through a pointer that its type's alignment does not
    hold (a 16-byte Pack at an address that is not a multiple of 16, say), where a CPU may not: the build traps on
    such an access (UBSan's alignment check, -fsanitize-undefined-trap-on-error), which stops the test run with
    "Fatal Python error: Illegal instruction" and the test's traceback."""
    build = ROOT / "build" / ("cuda_emulation_asan" if UNDER_ADDRESS_SANITIZER else "cuda_emulation")
    build.mkdir(parents=True, exist_ok=True)
    sanitizers = "address,alignment" if UNDER_ADDRESS_SANITIZER else "alignment"
    with pytest.MonkeyPatch.context() as patch:
        # cpp_extension finds ninja on PATH; the venv's bin folder is not on it when the venv is not activated.
        patch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        cpp_extension.load(
            name="ngd_ext_cuda_emulated",
            sources=[str(ROOT / "tests" / "cuda_emulation" / "proto_dgeo_emulated.cpp"),
                     str(ROOT / "tests" / "cuda_emulation" / "emulator_selftest.cpp"),
                     str(ROOT / "csrc" / "checks.cpp")],
            extra_cflags=["-O2", f"-fsanitize={sanitizers}", "-fsanitize-undefined-trap-on-error"],
            extra_ldflags=["-fsanitize=address"] if UNDER_ADDRESS_SANITIZER else [],
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


@pytest.fixture(params=SCHEDULES)
def schedule(request):
    """Runs the test's kernels under each order the emulator's threads may take between barriers (emulation.h's
    Schedule): a barrier missing between threads gives a wrong result under at least one of them."""
    torch.ops.ngd_emulator_selftest.set_schedule(request.param)
    yield request.param
    torch.ops.ngd_emulator_selftest.set_schedule("lockstep")


PARAMS = dict(tau=0.9, var_cap=0.1, margin=1.2)

SHAPES = [  # batch, dim, prototypes, classes: each tile shape, class sums in shared memory or not, odd sizes
    (1, 1, 25, 8),
    (7, 3, 25, 8),
    (100, 130, 25, 8),  # 4 tiles of 32 rows (K <= 32; 7 of 16 in float64), rows read element by element (D % 4 != 0)
    (70, 130, 33, 5),  # 16-row tiles over 64 prototype slots
    (90, 64, 64, 64),  # 64 prototype slots, 64 classes
    (129, 40, 1, 3),
    (40, 400, 25, 64),  # class sums (100 KiB and more) past shared memory: in place in the output
    (100, 1100, 25, 8),  # prototypes in chunks of 512 columns (float32; 128 in float64) taking turns in two
                         # buffers, the last step past D
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.usefixtures("schedule")
def test_shapes(dtype, shape):
    batch, dim, num_protos, num_classes = shape
    case = make_case(batch, dim, num_protos, num_classes, dtype=dtype, seed=batch + dim)
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(100, 130, 25, 8), (64, 128, 33, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.usefixtures("schedule")
def test_half_precision(dtype, shape):
    compare_half_dtype(emulated_loss, make_case(*shape, dtype=dtype, seed=1), **PARAMS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.usefixtures("schedule")
def test_vector_and_element_access_give_the_same_bits(dtype):
    """Rows that start off a vector boundary are read element by element, in the same arithmetic order."""
    case = make_case(70, 64, 25, 8, dtype=dtype, seed=7)
    aligned = weighted_grad(emulated_loss, case, **PARAMS)
    shifted = dict(case, z=off_vector_boundary(case["z"]))
    torch.testing.assert_close(weighted_grad(emulated_loss, shifted, **PARAMS), aligned, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
@pytest.mark.usefixtures("schedule")
def test_edge_cases(name):
    options = dict(EDGE_CASES[name])
    labels = options.get("labels")
    case = make_case(len(labels) if labels else 120, 48, 25, 8, seed=11, **options)
    losses = compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)
    if name == "one_class":
        assert losses[2].item() == 0.0
    if name == "no_positive":
        assert losses[1].item() == 0.0


@pytest.mark.parametrize("shape", [(64, 512, 25, 8), (48, 200, 40, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.usefixtures("schedule")
def test_float32_products_keep_float_accuracy(shape):
    """The tensor cores multiply TF32 values (10 mantissa bits); three products per float product keep float
    accuracy, at tau = 0.05, where cosine errors weigh 20-fold (test_fused.py checks the same on a GPU)."""
    assert_float_accuracy(emulated_loss, make_case(*shape, seed=12), **dict(PARAMS, tau=0.05))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry", sorted(NON_FINITE_Z))
def test_non_finite_z_gives_non_finite_loss(dtype, entry):
    case = make_case(40, 64, 25, 8, dtype=dtype, seed=2)
    assert_non_finite_z_gives_non_finite_loss(emulated_loss, case, entry, **PARAMS)


@pytest.mark.usefixtures("schedule")
def test_zero_row():
    case = make_case(40, 16, 25, 8, dtype=torch.float64, seed=2)
    case["z"][3] = 0
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


@pytest.mark.usefixtures("schedule")
def test_non_contiguous_inputs():
    compare_exact_dtype(emulated_loss, non_contiguous(make_case(96, 40, 25, 8, seed=4)), gpu=True, **PARAMS)


@pytest.mark.usefixtures("schedule")
def test_several_tiles_per_block():
    """Past its blocks x 16 rows (tiles of 16 rows at K > 32) a block of the row kernel loops over more than one tile;
    in float64 its prototypes go in three chunks of 128 columns through two buffers, the next tile's first chunk
    copied while this tile's last is multiplied. On a GPU that takes 264 x 16 rows; the grid held to 8 blocks, 300
    rows give 7 blocks of 3 tiles, the last one short."""
    case = make_case(300, 300, 33, 8, dtype=torch.float64, seed=3)
    torch.ops.ngd_ext_emulated.set_row_block_limit(8)
    try:
        compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)
    finally:
        torch.ops.ngd_ext_emulated.set_row_block_limit(0)


def test_label_out_of_range_trips_the_device_assertion():
    case = make_case(20, 8, 25, 8, seed=5)
    case["labels"][7] = 8
    with pytest.raises(RuntimeError, match="device-side assertion failed.*label is out of range"):
        emulated_loss(*case.values(), **PARAMS)


def test_a_build_for_other_gpus_says_how_to_rebuild():
    """Kernels compiled for other architectures than the GPU's (TORCH_CUDA_ARCH_LIST) fail at the runtime's first
    call on one; the error names the GPU's compute capability and the setting that serves it, in the forward and the
    backward."""
    case = make_case(20, 8, 25, 8, seed=5)
    outputs = torch.ops.ngd_ext_emulated.proto_dgeo_fwd(*case.values(), *PARAMS.values())
    ones = [torch.ones(())] * 3
    message = (r"not compiled for this GPU \(compute capability 9\.0\): rebuild them for it with "
               r'TORCH_CUDA_ARCH_LIST="9\.0" bash scripts/setup\.sh')
    torch.ops.ngd_ext_emulated.set_kernel_images_present(False)
    try:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.ngd_ext_emulated.proto_dgeo_fwd(*case.values(), *PARAMS.values())
        with pytest.raises(RuntimeError, match=message):
            torch.ops.ngd_ext_emulated.proto_dgeo_bwd(*ones, case["z"], case["protos"], case["target"],
                                                      case["labels"], *outputs[3:], PARAMS["tau"])
    finally:
        torch.ops.ngd_ext_emulated.set_kernel_images_present(True)


@pytest.mark.usefixtures("schedule")
def test_many_classes():
    """300 classes: 28 KiB of per-warp class statistics in shared memory, and class sums (117 KiB) added in place
    in the output."""
    case = make_case(40, 100, 25, 300, labels=[i % 20 for i in range(40)], seed=8)
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


@pytest.mark.usefixtures("schedule")
def test_one_step_of_prototypes_restaged():
    """Beside 400 classes' per-warp statistics and float64 partial products, shared memory holds one step of 64
    prototype slots: the row kernel restages one buffer at each chunk instead of taking turns in two."""
    case = make_case(40, 130, 33, 400, labels=[i % 20 for i in range(40)], dtype=torch.float64, seed=10)
    compare_exact_dtype(emulated_loss, case, gpu=True, **PARAMS)


# One past the limits (csrc/proto_dgeo.h) past which ngd_ext.proto_dgeo_loss routes CUDA inputs to the reference
# (test_fused.py checks that): the op itself refuses such inputs.

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


@pytest.mark.parametrize("offset", [32, -32, 1, -1], ids=["warp_above", "warp_below", "lane_above", "lane_below"])
def test_emulator_schedules_expose_a_missing_barrier(schedule, offset):
    """With no barrier between a write to shared memory and another thread's read of it, the read sees the write
    or not by the order the threads ran in. Reading from a later warp or lane is exposed (as NaN: not yet written)
    by the lockstep and in-order schedules, reading from an earlier one by the reversed schedule."""
    values = torch.arange(1, 97, dtype=torch.float32)  # three warps
    got = torch.ops.ngd_emulator_selftest.unsynchronised_read(values, offset)
    readers = torch.arange(max(0, -offset), 96 - max(0, offset))  # the threads whose slot `offset` away exists
    if (offset > 0) == (schedule != "reversed"):
        assert torch.isnan(got[readers]).all()
    else:
        assert torch.equal(got[readers], values[readers + offset])


def test_emulator_reversed_schedule_runs_blocks_last_to_first(schedule):
    """A block reading what the block before it wrote in the same launch sees it only where blocks run in order."""
    values = torch.arange(1, 6, dtype=torch.float32)
    seen = torch.ops.ngd_emulator_selftest.previous_block_read(values)
    if schedule == "reversed":
        assert torch.isnan(seen).all()
    else:
        assert torch.isnan(seen[0]) and torch.equal(seen[1:], values[:-1])


def test_emulator_shared_memory_starts_as_nan():
    assert torch.isnan(torch.ops.ngd_emulator_selftest.read_unwritten_shared()).all()


def test_emulator_static_shared_memory_starts_poisoned_in_every_block(schedule):
    """A block reading a static __shared__ variable before writing it finds 0xff bytes, not what the block before
    it left there: NaN in a float, -1 in an int."""
    floats, ints = torch.ops.ngd_emulator_selftest.read_unwritten_static_shared()
    assert torch.isnan(floats).all()
    assert torch.equal(ints, torch.full((3,), -1, dtype=torch.int32))


def test_emulator_async_copies_land_at_the_wait():
    values = torch.arange(1, 33, dtype=torch.float32)
    before, after = torch.ops.ngd_emulator_selftest.async_copy(values)
    assert torch.isnan(before).all()
    assert torch.equal(after, torch.where(torch.arange(32) % 2 == 1, 0.0, values))


def tf32_truncated(x):
    """x as the tensor cores read a float operand: its 13 low mantissa bits cleared."""
    return (x.view(torch.int32) & -(1 << 13)).view(torch.float32)


@pytest.mark.parametrize("shuffles", [False, True], ids=["tensor_core_model", "shuffles"])
def test_mma_tile_is_the_matrix_product(shuffles):
    """Fragments loaded as PTX lays them out for mma m16n8k8 multiply to c + a b, both in the emulator's model of
    the tensor cores and in the .cu's tile by shuffles (float64, and float32 before sm_80): in float64 as a sum in
    k order; in float32 the model reads each operand as TF32 (truncated, as the hardware does) and forms exact
    products, where the shuffles multiply whole floats."""
    generator = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((16, 8), (8, 8), (16, 8)))
    tile = torch.ops.ngd_ext_emulated.mma_tile
    torch.testing.assert_close(tile(a, b, c, shuffles), c + a @ b, rtol=1e-14, atol=1e-14)
    a32, b32 = a.float(), b.float()
    read = (lambda x: x) if shuffles else tf32_truncated
    want = (c + read(a32).double() @ read(b32).double()).float()
    torch.testing.assert_close(tile(a32, b32, c.float(), shuffles), want, rtol=1e-6, atol=1e-6)


def test_split_tf32_rounds_to_nearest_and_keeps_the_rest():
    """hi is x rounded to TF32 with ties away from zero (cvt.rna.tf32.f32), lo = x - hi exactly; where x is not
    finite, lo is NaN, so no product with it is finite."""
    ulp = 2.0 ** -10  # TF32 keeps 10 of float32's 23 mantissa bits
    ties = torch.tensor([1 + ulp / 2, 1 + ulp / 2 - 2.0 ** -23, -(1 + ulp / 2), 1 + 1.5 * ulp, 3.0])
    hi, lo = torch.ops.ngd_ext_emulated.split_tf32(ties)
    assert torch.equal(hi, torch.tensor([1 + ulp, 1.0, -(1 + ulp), 1 + 2 * ulp, 3.0]))
    values = torch.randn(10000, generator=torch.Generator().manual_seed(2)) * torch.logspace(-30, 30, 10000)
    hi, lo = torch.ops.ngd_ext_emulated.split_tf32(values)
    assert torch.equal(tf32_truncated(hi), hi)
    assert torch.equal(hi.double() + lo.double(), values.double())
    assert (lo.abs() <= values.abs() * 2.0 ** -11).all()
    gpu_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)  # whose hi is -0
    hi, lo = torch.ops.ngd_ext_emulated.split_tf32(torch.cat([torch.tensor([float("inf"), -float("inf")]), gpu_nan]))
    assert torch.equal(hi[:2], torch.tensor([float("inf"), -float("inf")])) and lo.isnan().all()


@pytest.mark.parametrize("kernel, message", [
    ("divergent_shuffle", "a shuffle reached by only part of a warp"),
    ("partial_barrier", r"__syncthreads\(\) reached by only part of the block"),
    ("oversized_shared", "asks for 65536 bytes of dynamic shared memory, more than 49152"),
])
def test_emulator_refuses_what_a_gpu_would_run_wrongly(kernel, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.ngd_emulator_selftest, kernel)()


# The AddressSanitizer run: every test but the other two schedules' repeats and this one.
