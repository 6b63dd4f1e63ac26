"""Inputs for the Proto-KD + D-Geo tests, and the comparisons and subprocess runs the tests share; MAHNOB-HCI sessions
for the EEG tests."""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from ngd_ext import reference
from ngd_ext.data.eeg import MAHNOB_EEG, read_mahnob_trial, scan_mahnob, write_bdf, write_session_xml

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


def non_contiguous(case):
    """The case with every tensor copied into strided storage: matrices column-major with gaps, vectors with gaps."""
    strided_case = {}
    for name, tensor in case.items():
        if tensor.dim() == 2:
            rows, cols = tensor.shape
            strided = torch.empty(cols, 2 * rows, dtype=tensor.dtype, device=tensor.device).T[::2]
        else:
            strided = torch.empty(2 * tensor.shape[0], dtype=tensor.dtype, device=tensor.device)[::2]
        strided_case[name] = strided.copy_(tensor)
        assert not strided_case[name].is_contiguous()
    return strided_case


def off_vector_boundary(z):
    """A contiguous copy of z whose rows start one element past an allocation's alignment (off every vector
    boundary a kernel might read by)."""
    shifted = torch.empty(z.numel() + 1, dtype=z.dtype, device=z.device)[1:].view_as(z).copy_(z)
    assert shifted.is_contiguous() and shifted.data_ptr() % 8 != 0
    return shifted


def weighted_grad(loss_fn, case, weights=(0.7, -1.3, 2.1), **kwargs):
    """The three losses, and the gradient of a weighted sum of them (so that each term is tested)."""
    z = case["z"].detach().requires_grad_(True)  # the same storage: alignment and strides as the case gives them
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


TOLERANCES = {  # (losses, gradient) as (rtol, atol)
    torch.float64: ((1e-10, 1e-12), (1e-9, 1e-12)),
    torch.float32: ((1e-5, 1e-6), (1e-4, 1e-6)),
}


def compare_exact_dtype(loss_fn, case, gpu=False, **params):
    """float32 / float64: loss_fn (a fused implementation) against the reference run in the same dtype."""
    dtype = case["z"].dtype
    fused_losses, fused_grad = weighted_grad(loss_fn, case, **params)
    ref_losses, ref_grad = weighted_grad(reference.proto_dgeo_loss, case, **params)
    (loss_rtol, loss_atol), (grad_rtol, grad_atol) = TOLERANCES[dtype]
    if gpu and dtype == torch.float32:
        loss_atol = 1e-5  # the GPU forms class variances as E||u||^2 - ||mu||^2 (absolute error ~1e-6)
    for name, got, want in zip(("proto_kd", "var_cap", "margin"), fused_losses, ref_losses):
        assert got.dtype == want.dtype and got.shape == ()
        torch.testing.assert_close(got, want, rtol=loss_rtol, atol=loss_atol, msg=lambda m: f"{name}: {m}")
    assert fused_grad.dtype == dtype and fused_grad.shape == case["z"].shape
    grad_scale = max(1.0, ref_grad.abs().max().item())
    torch.testing.assert_close(fused_grad, ref_grad, rtol=grad_rtol, atol=grad_atol * grad_scale)
    return fused_losses


# Non-finite entries of z: float("nan") is 0x7fc00000, while a GPU's NaN (CUDA's NAN, what its arithmetic produces)
# is 0x7fffffff, whose TF32 rounding in the CUDA kernels' float split is -0 (the rest goes to the low part).
NON_FINITE_Z = {
    "nan": float("nan"),
    "gpu_nan": torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32),
    "inf": float("inf"),
    "minus_inf": -float("inf"),
}


def assert_non_finite_z_gives_non_finite_loss(loss_fn, case, entry, **params):
    """SPEC section 4: where values go unchecked (CUDA, to spare a host synchronisation), a non-finite z must give a
    non-finite loss, which stage 3 refuses. Proto-KD averages over every row, so that is the loss that must show it;
    a NaN dropped by a max or min on the way would leave it finite."""
    z = case["z"].clone()
    z[3, 5] = NON_FINITE_Z[entry]  # converted to z's dtype
    proto_kd, _, _ = loss_fn(z, case["protos"], case["target"], case["labels"], case["positive"], **params)
    assert not torch.isfinite(proto_kd)
    healthy, _, _ = loss_fn(case["z"], case["protos"], case["target"], case["labels"], case["positive"], **params)
    assert torch.isfinite(healthy)


def assert_float_accuracy(loss_fn, case, **params):
    """loss_fn's float32 gradient is as accurate as float32 allows, however it multiplies: against a float64
    reference, its error is within 8x that of the reference run in float32 (where a single TF32 product per float
    product, 10 mantissa bits, would be hundreds of times worse)."""
    exact = {name: value.double() if value.is_floating_point() else value for name, value in case.items()}
    _, want = weighted_grad(reference.proto_dgeo_loss, exact, **params)
    _, got = weighted_grad(loss_fn, case, **params)
    _, single = weighted_grad(reference.proto_dgeo_loss, case, **params)
    assert (got.double() - want).abs().max() <= 8 * (single.double() - want).abs().max()


def compare_half_dtype(loss_fn, case, **params):
    """bfloat16 / float16: loss_fn's error against a float64 reference on the same (upcast) inputs is at most
    twice the error of the reference run on the half-precision inputs."""
    exact = dict(case, z=case["z"].double())
    want_losses, want_grad = weighted_grad(reference.proto_dgeo_loss, exact, **params)
    fused_losses, fused_grad = weighted_grad(loss_fn, case, **params)
    ref_losses, ref_grad = weighted_grad(reference.proto_dgeo_loss, case, **params)
    assert fused_grad.dtype == case["z"].dtype
    for got, ref, want in zip(fused_losses, ref_losses, want_losses):
        assert got.dtype == torch.float32
        assert abs(got.double() - want) <= 2 * abs(ref.double() - want) + 1e-6 * (1 + abs(want))
    fused_error = (fused_grad.double() - want_grad).abs().max()
    ref_error = (ref_grad.double() - want_grad).abs().max()
    assert fused_error <= 2 * ref_error + 1e-6 * want_grad.abs().max()


SHAPES = [  # batch, dim, prototypes, classes
    (1, 1, 25, 8),
    (7, 3, 25, 8),
    (256, 127, 25, 8),
    (256, 128, 25, 8),
    (1000, 130, 7, 5),
    (1000, 512, 33, 8),
    (300, 64, 64, 64),
    (129, 40, 1, 3),
]

EDGE_CASES = {
    "absent_class": dict(labels=[0, 1, 1, 3, 3, 3, 0, 1, 4, 4, 0, 1] * 5),
    "singletons": dict(labels=[0, 1, 2, 2, 4, 5, 6, 6, 7, 3]),
    "one_class": dict(labels=[2] * 50),
    "all_positive": dict(positive=tuple(range(8))),
    "no_positive": dict(positive=()),
    "zeros_in_target": dict(sparse_target=True),
    "large_magnitude": dict(scale=1e4),
    "tiny_magnitude": dict(scale=1e-20),
}


def address_sanitizer_runtime():
    """(AddressSanitizer's runtime, libstdc++) as the C++ compiler names them; the first is not an absolute path where
    the compiler has no runtime."""
    compiler = os.environ.get("CXX", "c++")
    return tuple(subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                 for name in ("libasan.so", "libstdc++.so"))


def run_under_address_sanitizer(script_args, env_extra, cwd):
    """Runs `python script_args...` (a pytest run whose C++ extension is built with -fsanitize=address) with
    AddressSanitizer's runtime preloaded, and checks that the sanitizer found nothing and the tests passed. The
    runtime is preloaded with libstdc++, which its hook on C++ throws must find loaded (the ops throw their
    errors); the calling test skips where the compiler has no runtime."""
    runtime, libstdcxx = address_sanitizer_runtime()
    if not os.path.isabs(runtime):
        pytest.skip("the C++ compiler has no AddressSanitizer runtime")
    env = dict(os.environ, LD_PRELOAD=f"{runtime} {libstdcxx}", ASAN_OPTIONS="detect_leaks=0", **env_extra)
    result = subprocess.run([sys.executable, *script_args], env=env, capture_output=True, text=True, cwd=cwd)
    finding = result.stderr.find("ERROR: AddressSanitizer")
    # The test that was running ends the -v output; the sanitizer's finding and its stacks start at the ERROR line.
    report = result.stdout[-2000:] + (result.stderr[finding:finding + 6000] if finding >= 0 else result.stderr[-6000:])
    assert result.returncode == 0 and finding < 0, report
    # Passed, and nothing failed (other torch versions may add a count of deprecation warnings).
    assert re.search(r"^=+ \d+ passed(, \d+ skipped)?, \d+ deselected(, \d+ warnings?)? in ", result.stdout,
                     re.MULTILINE), report


def run_under_gloo(body, out_dir, world=2):
    """Runs body(rank, world) in each of `world` processes of a gloo group and returns what each returned (tensors,
    in containers torch.load takes with weights_only), in rank order. body must be a module-level function."""
    torch.multiprocessing.spawn(_gloo_process, args=(body, world, str(out_dir)), nprocs=world)
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=True) for rank in range(world)]


def _gloo_process(rank, body, world, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'init')}", rank=rank,
                                         world_size=world)
    try:
        torch.save(body(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
    # The gradient all-reduce DDP starts in backward keeps the Python context torch stashes for the backward. When a
    # gloo thread lets go of it while the interpreter is finalizing, taking the GIL ends that thread and the process
    # aborts ("terminate called without an active exception"; pytorch/pytorch#117762): 4 of 40 runs of
    # test_distributed here, torch 2.14. Leaving without finalizing avoids it: 0 of 40 runs of both DDP tests.
    os._exit(0)


def kill_process_tree(pid):
    """SIGKILL a process and all its descendants at once, as a machine failure stops them: torchrun starts its
    workers in sessions of their own, out of reach of a kill of its process group (Linux: reads /proc)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        tree.append(pending.pop())
        pending.extend(children.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


# MAHNOB-HCI ---------------------------------------------------------------------------------------------------

def write_mahnob_session(root, session, subject, felt=(7, 3), sfreq=256, seconds=4, baseline=31, order=None,
                         rng=None, events=2, drop=(), constant=(), common=0.0, gains=None, extra=None):
    """A session folder with its session.xml and BDF of white noise (sd 30 uV) on every channel; `constant`
    channels hold 150 uV throughout, `gains` scales channels (by a number, or sample by sample), `extra` adds to
    them, and `common` is added to all (what every channel stored against CMS shares)."""
    rng = rng or np.random.default_rng(session)
    folder = os.path.join(root, "Sessions", str(session))
    os.makedirs(folder)
    write_session_xml(os.path.join(folder, "session.xml"), session, subject, *(felt or (None, None)))
    names = [name for name in (order or MAHNOB_EEG) if name not in drop] + ["EXG1"]
    samples = (baseline + seconds + 2) * sfreq
    signals = rng.normal(0, 30, (len(names), samples))
    for name, gain in (gains or {}).items():
        signals[names.index(name)] *= gain
    for name, added in (extra or {}).items():
        signals[names.index(name)] += added
    signals += common
    signals[[names.index(name) for name in constant]] = 150.0  # microvolts, throughout
    status = np.zeros(samples)
    start, stop = baseline * sfreq, (baseline + seconds) * sfreq
    for onset in [start, stop][:events]:
        status[onset:onset + 5] = 1 if onset == start else 2
    write_bdf(os.path.join(folder, f"Part_{subject}_S_Trial{session}_emotion.bdf"), names, signals, sfreq, status)
    return names, signals, start, stop


def read_only_session(root):
    (session,) = scan_mahnob(root).sessions
    return read_mahnob_trial(session)
