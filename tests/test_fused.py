"""The fused op against the reference: shapes, dtypes, edge cases, gradcheck, opcheck, torch.compile,
determinism, CUDA graphs, the CPU kernels' baseline variant and an AddressSanitizer build of them, and the
fallback when the extension is missing. CUDA cases skip without a GPU."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from torch.autograd import forward_ad
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (DEVICES, EDGE_CASES, NON_FINITE_Z, SHAPES, assert_float_accuracy,
                     assert_non_finite_z_gives_non_finite_loss, compare_exact_dtype, compare_half_dtype,
                     kink_free_params, make_case, non_contiguous, off_vector_boundary, run_under_address_sanitizer,
                     weighted_grad)
import ngd_ext
from ngd_ext import reference

pytestmark = pytest.mark.skipif(not ngd_ext.fused_available("cpu"), reason="ngd_ext._C is not built")

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The CPU tests that the reruns below run again: neither rerun nor the fallback test, which start processes of their
# own, and no CUDA case.
CPU_RERUN = "not cuda and not falls_back and not baseline_cpu_variant and not address_sanitizer"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(device, dtype, shape):
    batch, dim, num_protos, num_classes = shape
    case = make_case(batch, dim, num_protos, num_classes, dtype=dtype, device=device, seed=batch + dim)
    compare_exact_dtype(ngd_ext.proto_dgeo_loss, case, gpu=device == "cuda", tau=0.9, var_cap=0.2,
                        margin=0.5 if dim > 3 else 1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7, 3, 25, 8), (256, 128, 25, 8), (1000, 130, 33, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_half_precision(device, dtype, shape):
    batch, dim, num_protos, num_classes = shape
    case = make_case(batch, dim, num_protos, num_classes, dtype=dtype, device=device, seed=dim)
    compare_half_dtype(ngd_ext.proto_dgeo_loss, case, tau=0.9, var_cap=0.05, margin=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases(device, dtype, name):
    options = dict(EDGE_CASES[name])
    labels = options.get("labels")
    batch = len(labels) if labels else 200
    case = make_case(batch, 48, 25, 8, dtype=dtype, device=device, seed=11, **options)
    losses = compare_exact_dtype(ngd_ext.proto_dgeo_loss, case, gpu=device == "cuda", tau=0.9, var_cap=0.1, margin=1.2)
    if name == "one_class":
        assert losses[2].item() == 0.0  # no pair of present classes
    if name == "no_positive":
        assert losses[1].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_extreme_tau(device, tau):
    compare_exact_dtype(ngd_ext.proto_dgeo_loss, make_case(300, 64, 25, 8, device=device, seed=5), gpu=device == "cuda",
                        tau=tau, var_cap=0.1, margin=1.2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_zero_row(device, dtype):
    case = make_case(40, 16, 25, 8, dtype=dtype, device=device, seed=2)
    case["z"][3] = 0
    compare_exact_dtype(ngd_ext.proto_dgeo_loss, case, gpu=device == "cuda", tau=0.9, var_cap=0.1, margin=1.2)
    _, grad = weighted_grad(ngd_ext.proto_dgeo_loss, case)
    assert grad[3].abs().max() > 1e5  # F.normalize semantics: dU / eps below the norm floor


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    case = non_contiguous(make_case(96, 40, 25, 8, device=device, seed=4))
    compare_exact_dtype(ngd_ext.proto_dgeo_loss, case, gpu=device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_z_off_a_vector_boundary(device, dtype):
    """Contiguous rows that start one element past an allocation's alignment: the CUDA kernels must read them
    element by element (a vector read there faults on a GPU)."""
    case = make_case(70, 64, 25, 8, dtype=dtype, device=device, seed=7)
    case["z"] = off_vector_boundary(case["z"])
    if dtype == torch.float32:
        compare_exact_dtype(ngd_ext.proto_dgeo_loss, case, gpu=device == "cuda")
    else:
        compare_half_dtype(ngd_ext.proto_dgeo_loss, case)


@pytest.mark.parametrize("device", DEVICES)
def test_protos_and_target_in_other_dtypes(device):
    case = make_case(128, 32, 25, 8, device=device, seed=8)
    want = weighted_grad(ngd_ext.proto_dgeo_loss, case)
    case["protos"], case["target"] = case["protos"].float(), case["target"].float()
    got = weighted_grad(ngd_ext.proto_dgeo_loss, case)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_fused(device, seed):
    case = make_case(batch=30, dim=7, num_protos=9, num_classes=4, dtype=torch.float64, device=device, seed=seed,
                     positive=(0, 1, 2, 3))
    params = kink_free_params(case)
    z = case.pop("z").requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ngd_ext.proto_dgeo_loss(x, **case, **params), (z,), eps=1e-6,
                                    atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck_fused(device):
    case = make_case(batch=30, dim=7, num_protos=9, num_classes=4, dtype=torch.float64, device=device, seed=0,
                     positive=(0, 1, 2, 3))
    params = kink_free_params(case)
    z = case.pop("z").requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: ngd_ext.proto_dgeo_loss(x, **case, **params), (z,), eps=1e-6,
                                        atol=1e-6)


def gradient_penalty(loss, z, probe):
    (grad,) = torch.autograd.grad(loss(z), z, create_graph=True)
    return torch.autograd.grad((grad * probe).sum(), z)[0]


def forward_mode(loss, z, probe):
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(loss(forward_ad.make_dual(z, probe))).tangent


# How each way of differentiating is served: the fused kernels where the op's registration serves it, else the
# reference (create_graph=True needs a differentiable gradient; forward mode and torch.func transforms, see ops.py).
FORWARD, BACKWARD = "ngd_ext::proto_dgeo_fwd", "ngd_ext::proto_dgeo_bwd"
DIFFERENTIATIONS = {
    "backward": (lambda loss, z, probe: torch.autograd.grad(loss(z), z)[0], [FORWARD, BACKWARD]),
    "gradient_penalty": (gradient_penalty, [FORWARD]),
    "forward_ad": (forward_mode, []),
    "func_jvp": (lambda loss, z, probe: torch.func.jvp(loss, (z,), (probe,))[1], []),
    "func_grad": (lambda loss, z, probe: torch.func.grad(loss)(z), []),
    "func_hessian": (lambda loss, z, probe: torch.func.hessian(loss)(z), []),
}


class FusedOpsRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.called = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "ngd_ext":
            self.called.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's own use of it
@pytest.mark.parametrize("mode", DIFFERENTIATIONS)
def test_every_way_of_differentiating_matches_reference(mode):
    """Each way of differentiating the loss gives the reference's derivatives, with a term left out of the loss (None
    reaches the backward), and runs the fused ops it is expected to."""
    differentiate, fused_ops = DIFFERENTIATIONS[mode]
    case = make_case(24, 6, 9, 4, dtype=torch.float64, seed=17, positive=(0, 1, 2, 3))
    params = kink_free_params(case)
    z, rest = case["z"], [case[name] for name in ("protos", "target", "labels", "positive")]
    probe = torch.randn(z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(3))

    def derivative(loss_fn):
        def loss(x):
            proto_kd, _var_cap, margin = loss_fn(x, *rest, **params)
            return 0.7 * proto_kd + 2.1 * margin
        return differentiate(loss, z.clone().requires_grad_(mode in ("backward", "gradient_penalty")), probe)

    with FusedOpsRecorder() as recorder:
        got = derivative(ngd_ext.proto_dgeo_loss)
    want = derivative(reference.proto_dgeo_loss)
    assert recorder.called == fused_ops
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert want.abs().max() > 1e-3


@pytest.mark.skipif(not ngd_ext.fused_available("cuda"), reason="the CUDA kernels are not built")
def test_inputs_beyond_the_cuda_kernels_go_to_the_reference():
    """More prototypes or classes than the CUDA kernels hold (a 9 x 9 grid's 81 prototypes, say): proto_dgeo_loss
    routes CUDA inputs to the reference (fake CUDA tensors show which way without a GPU), CPU inputs to the fused op,
    which has no such limit. The limits are the CUDA op's own (test_cuda_emulated checks its errors at them)."""
    def beyond(num_protos, num_classes, device):
        z, protos = torch.empty(16, 8, device=device), torch.empty(num_protos, 8, device=device)
        return ngd_ext.ops._beyond_cuda_kernels(z, protos, torch.empty(num_classes, num_protos, device=device))

    assert (ngd_ext.ops.CUDA_MAX_PROTOS, ngd_ext.ops.CUDA_MAX_CLASSES) == (64, 1024)
    with FakeTensorMode():
        assert not beyond(64, 1024, "cuda")
        assert beyond(65, 8, "cuda") and beyond(81, 8, "cuda") and beyond(25, 1025, "cuda")
        assert not beyond(81, 2000, "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    case = make_case(64, 24, 25, 8, device=device, seed=6)
    z = case["z"].requires_grad_(True)
    args = (z, case["protos"], case["target"], case["labels"], case["positive"], 0.9, 0.2, 0.5)
    torch.library.opcheck(torch.ops.ngd_ext.proto_dgeo_fwd.default, args)
    saved = torch.ops.ngd_ext.proto_dgeo_fwd(*args)
    grads = [torch.tensor(w, device=device) for w in (0.5, 1.0, 2.0)]
    torch.library.opcheck(torch.ops.ngd_ext.proto_dgeo_bwd.default,
                          (*grads, z.detach(), case["protos"], case["target"], case["labels"], *saved[3:], 0.9))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    case = make_case(200, 64, 25, 8, device=device, seed=9)
    compiled = torch.compile(ngd_ext.proto_dgeo_loss, fullgraph=True)
    torch.testing.assert_close(weighted_grad(compiled, case), weighted_grad(ngd_ext.proto_dgeo_loss, case),
                               rtol=0, atol=0)


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.7, 1.3)])
@pytest.mark.parametrize("compile_it", [False, True], ids=["eager", "compiled"])
def test_gradient_of_some_terms_only(weights, compile_it):
    """Terms left out of the loss get no gradient (None, not zeros, reaches the backward)."""
    case = make_case(150, 40, 25, 8, dtype=torch.float64, seed=13)

    def partial_loss(z):
        losses = ngd_ext.proto_dgeo_loss(z, case["protos"], case["target"], case["labels"], case["positive"])
        return sum(w * loss for w, loss in zip(weights, losses) if w)

    fused = torch.compile(partial_loss, fullgraph=True) if compile_it else partial_loss
    z = case["z"].clone().requires_grad_(True)
    (got,) = torch.autograd.grad(fused(z), z)
    _, want = weighted_grad(reference.proto_dgeo_loss, case, weights=weights)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(device, dtype):
    case = make_case(3000, 96, 25, 8, dtype=dtype, device=device, seed=10)
    first, second = weighted_grad(ngd_ext.proto_dgeo_loss, case), weighted_grad(ngd_ext.proto_dgeo_loss, case)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_cpu_result_does_not_depend_on_thread_count():
    case = make_case(3000, 96, 25, 8, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weighted_grad(ngd_ext.proto_dgeo_loss, case)
        torch.set_num_threads(2)
        two = weighted_grad(ngd_ext.proto_dgeo_loss, case)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=0)


def cpu_flags():
    """The processor's feature flags from /proc/cpuinfo (empty where there is none)."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_cpu_kernel_variant():
    forced = os.environ.get("NGD_CPU_BASELINE") == "1"
    want = "avx2+fma" if {"avx2", "fma"} <= cpu_flags() and not forced else "baseline"
    assert ngd_ext._C.cpu_kernel_variant() == want


def test_baseline_cpu_variant_passes_the_cpu_tests():
    """The CPU chunk math is compiled twice on x86-64; its baseline variant runs on processors without AVX2 and
    off x86-64, so this file's CPU tests run again with it forced."""
    if os.environ.get("NGD_CPU_BASELINE") == "1":
        pytest.skip("this is the baseline run")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", __file__, "-k", CPU_RERUN],
        env=dict(os.environ, NGD_CPU_BASELINE="1"), capture_output=True, text=True, cwd=ROOT)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and "skipped" not in summary, result.stdout[-4000:]
    assert "test_cpu_kernel_variant PASSED" in result.stdout


def test_cpu_kernels_pass_under_address_sanitizer():
    """The CPU kernels read and write whole vectors up to the ends of rows and tensors, and an access past an
    allocation's end rarely faults on a CPU: this file's CPU tests run again against a build of the CPU op with
    AddressSanitizer (setup.py's flags, CUDA left out), which stops at the first such access and names it."""
    build = ROOT / "build" / "cpu_asan"
    build.mkdir(parents=True, exist_ok=True)
    sources = [str(path) for folder in ("csrc", "csrc/cpu") for path in sorted((ROOT / folder).glob("*.cpp"))]
    script = (
        "import sys\n"
        "import pytest\n"
        "from torch.utils import cpp_extension\n"
        f"module = cpp_extension.load(name='_C', sources={sources!r}, build_directory={str(build)!r},"
        " extra_cflags=['-O3', '-fopenmp', '-ffp-contract=fast', '-fsanitize=address'],"
        " extra_ldflags=['-fopenmp', '-fsanitize=address'])\n"
        "sys.modules['ngd_ext._C'] = module\n"  # ngd_ext imports it from there instead of its own build
        "import ngd_ext\n"
        "ngd_ext._C = module\n"
        # -s: the sanitizer's report goes to stderr as the process ends, which pytest's capture would swallow.
        f"sys.exit(pytest.main(['-v', '-s', '-p', 'no:cacheprovider', {__file__!r}, '-k', {CPU_RERUN!r}]))\n"
    )
    # cpp_extension runs ninja from PATH, where the venv's bin folder is not unless the venv is activated.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    run_under_address_sanitizer(["-c", script], {"PATH": path}, ROOT)


def test_falls_back_to_reference_without_extension(tmp_path):
    """ngd_ext where nothing built its extension (a copy of the package without it) says so, and how to build it, and
    runs the reference."""
    shutil.copytree(ROOT / "ngd_ext", tmp_path / "ngd_ext", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = (
        "import sys, warnings\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"  # pip -e's
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import ngd_ext\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from helpers import make_case\n"
        "from ngd_ext import reference\n"
        "case = make_case(50, 16, 25, 8)\n"
        "got = [x.item() for x in ngd_ext.proto_dgeo_loss(**case)]\n"
        "want = [x.item() for x in reference.proto_dgeo_loss(**case)]\n"
        "print(ngd_ext.fused_available('cpu'), ngd_ext.fused_available('cuda'), got == want)\n"
        "print(*[w.message for w in caught], sep='\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    availability, warning = result.stdout.splitlines()[:2]
    assert availability == "False False True"
    assert warning == ("ngd_ext's fused op is not built: proto_dgeo_loss runs the pure-PyTorch reference; build it "
                       "with `pip install -e .` in the project's folder (or `bash scripts/setup.sh`)")


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def poison_cuda_allocator():
    """Fill the caching allocator's free memory with NaN, so that an output the kernel forgets to write shows."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    poison = torch.full((64 * 1024 * 1024,), float("nan"), device="cuda")
    del poison


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(5000, 512, 25, 8), (70, 2048, 64, 64), (3, 130, 7, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_outputs_fully_written(dtype, shape):
    case = make_case(*shape, dtype=dtype, device="cuda", seed=13)
    poison_cuda_allocator()
    compare_exact_dtype(ngd_ext.proto_dgeo_loss, case, gpu=True, tau=0.9, var_cap=0.1, margin=1.2)
    poison_cuda_allocator()
    outputs = torch.ops.ngd_ext.proto_dgeo_fwd(case["z"], case["protos"], case["target"], case["labels"],
                                               case["positive"], 0.9, 0.1, 1.2)
    assert all(torch.isfinite(out).all() for out in outputs)


@cuda_only
@pytest.mark.parametrize("shape", [(64, 512, 25, 8), (48, 200, 40, 8), (8192, 2048, 25, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_float32_products_keep_float_accuracy(shape):
    """The tensor cores read each float operand as TF32, and the kernels split every value in two for three products
    per float product: on the hardware, as in the emulator, the gradient keeps float accuracy."""
    case = make_case(*shape, device="cuda", seed=12)
    assert_float_accuracy(ngd_ext.proto_dgeo_loss, case, tau=0.05, var_cap=0.1, margin=1.2)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry", sorted(NON_FINITE_Z))
def test_cuda_non_finite_z_gives_non_finite_loss(dtype, entry):
    case = make_case(40, 64, 25, 8, dtype=dtype, device="cuda", seed=2)
    assert_non_finite_z_gives_non_finite_loss(ngd_ext.proto_dgeo_loss, case, entry)


@cuda_only
def test_cuda_beyond_the_kernels_runs_the_reference():
    case = make_case(300, 64, 81, 8, device="cuda", seed=22)  # a 9 x 9 grid
    with FusedOpsRecorder() as recorder, pytest.warns(UserWarning, match=r"at most 64 prototypes .* K = 81, C = 8"):
        got = weighted_grad(ngd_ext.proto_dgeo_loss, case)
    assert recorder.called == []
    # Not bit for bit: the reference's class sums (index_add_) use atomics on a GPU.
    torch.testing.assert_close(got, weighted_grad(reference.proto_dgeo_loss, case), rtol=1e-5, atol=1e-6)


@cuda_only
def test_cuda_graph_replay_matches_eager():
    case = make_case(4096, 128, 25, 8, device="cuda", seed=14)
    static_z = case["z"].clone()
    fixed = (case["protos"], case["target"], case["labels"], case["positive"])
    grads = [torch.tensor(w, device="cuda") for w in (0.7, -1.3, 2.1)]

    def step(z):
        saved = torch.ops.ngd_ext.proto_dgeo_fwd(z, *fixed, 0.9, 0.1, 1.2)
        grad_z = torch.ops.ngd_ext.proto_dgeo_bwd(*grads, z, case["protos"], case["target"], case["labels"],
                                                  *saved[3:], 0.9)
        return saved[:3], grad_z

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static_z)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_losses, static_grad = step(static_z)
    for seed in (15, 16):
        fresh = make_case(4096, 128, 25, 8, device="cuda", seed=seed)["z"]
        static_z.copy_(fresh)
        graph.replay()
        want_losses, want_grad = step(fresh)
        torch.testing.assert_close((static_losses, static_grad), (want_losses, want_grad), rtol=0, atol=0)


@cuda_only
def test_cuda_graphs_of_torch_compile_match_eager():
    """mode="reduce-overhead": Inductor captures the forward and the backward graph, each op of them included, in
    CUDA graphs and replays them with each new batch copied in. The replays give eager's losses and gradient bit for
    bit, and no graph is left to run outside a CUDA graph."""
    case = make_case(4096, 512, 25, 8, device="cuda", seed=17)
    fixed = {name: case[name] for name in ("protos", "target", "labels", "positive")}
    weights = (0.7, -1.3, 2.1)

    def step(z):
        losses = ngd_ext.proto_dgeo_loss(z, **fixed, tau=0.9, var_cap=0.1, margin=1.2)
        return losses, sum(w * loss for w, loss in zip(weights, losses))

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for seed in (18, 19, 20, 21):  # a warm-up run, a recording run, then replays
        z = make_case(4096, 512, 25, 8, device="cuda", seed=seed)["z"]
        results = []
        for run in (compiled, step):
            x = z.clone().requires_grad_(True)
            losses, total = run(x)
            (grad,) = torch.autograd.grad(total, x)
            results.append([loss.detach().clone() for loss in losses] + [grad.clone()])
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
