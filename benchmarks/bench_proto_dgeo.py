"""Benchmark: the fused Proto-KD + D-Geo op against the pure-PyTorch reference, eager and torch.compile'd.

    python benchmarks/bench_proto_dgeo.py                       # CPU, or CUDA when a GPU is present
    python benchmarks/bench_proto_dgeo.py --batch 8192 --dim 512 --dtype float32 --mode fwdbwd
    python benchmarks/bench_proto_dgeo.py --profile --batch 8192 65536 --dim 512 2048 --dtype float32
    ncu -k regex:forward_rows python benchmarks/bench_proto_dgeo.py --profile-plain --batch 65536 --dim 2048

Times forward (under no_grad), backward (on a retained graph) and both, for every provider, batch size,
width and dtype asked for; prints a table and writes JSON with the machine, versions and thread count.
CPU timings are torch.utils.benchmark medians; CUDA timings are triton.testing.do_bench medians (it flushes
L2 between runs), with CUDA-graph replays of the fused op alongside. Inputs are random normal, never zeros.

On CPU every provider's time includes the first touch of the memory it allocates, which for large outputs
(the backward's gradient) is mostly page faults; PyTorch's allocator asks for transparent huge pages, which
take far fewer, when THP_MEM_ALLOC_ENABLE=1 is set. The JSON records that variable and the kernel's THP mode.

--profile says where the fused op's time goes instead: torch.profiler over forward + backward steps, each kernel's
(CUDA) or op's (CPU) time and share per shape. --profile-plain only runs the steps, for an outside profiler (ncu).
"""

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.utils.benchmark as benchmark
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ngd_ext  # noqa: E402
from ngd_ext import reference  # noqa: E402

PROVIDERS = ("fused", "eager", "compiled")
MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PARAMS = dict(tau=0.9, var_cap=0.2, margin=0.5)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when a GPU is present)")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 8192, 65536], help="batch sizes B")
    parser.add_argument("--dim", type=int, nargs="+", default=[128, 512, 2048], help="embedding widths D")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--provider", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--num-protos", type=int, default=25, help="prototypes K (default 25, the 5x5 grid)")
    parser.add_argument("--num-classes", type=int, default=8, help="classes C (default 8, FERPlus)")
    parser.add_argument("--compile-dynamic", action="store_true",
                        help="compile the reference once with dynamic shapes instead of once per shape "
                             "(much less compile time; its kernels may be a little slower)")
    parser.add_argument("--time-budget", type=float, default=float("inf"),
                        help="seconds after which no new configuration is started (the rest are listed as skipped)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the fused op's forward + backward kernel by kernel instead of timing providers")
    parser.add_argument("--profile-plain", action="store_true",
                        help="run the fused op's forward + backward steps unprofiled, for an outside profiler")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per shape (default 10)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/proto_dgeo_<device>.json, "
                                                    "or profile_<device>.json with --profile)")
    return parser.parse_args()


def make_inputs(batch, dim, num_protos, num_classes, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(batch * 7 + dim)
    z = torch.randn(batch, dim, generator=generator).to(device=device, dtype=dtype)
    protos = torch.randn(num_protos, dim, generator=generator).to(device)
    target = torch.softmax(torch.randn(num_classes, num_protos, generator=generator) * 2, dim=1).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    positive = torch.zeros(num_classes, dtype=torch.bool)
    positive[[1, 2]] = True
    return z, protos, target, labels, positive.to(device)


def make_callables(loss_fn, z, rest):
    """fwd, bwd and fwdbwd closures for one provider. Backward starts from the three losses with unit
    gradients, as the gradient of their sum would, but without timing the additions of a Python sum()."""
    def forward():
        with torch.no_grad():
            return loss_fn(z, *rest, **PARAMS)

    leaf = z.detach().requires_grad_(True)
    unit_grads = [torch.ones_like(loss) for loss in forward()]
    retained = {}

    def backward():
        if "losses" not in retained:  # built on the untimed first call
            retained["losses"] = loss_fn(leaf, *rest, **PARAMS)
        return torch.autograd.grad(retained["losses"], leaf, unit_grads, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(loss_fn(leaf, *rest, **PARAMS), leaf, unit_grads)

    return {"fwd": forward, "bwd": backward, "fwdbwd": forward_backward}


def time_cpu(fn):
    fn()
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return measurement.blocked_autorange(min_run_time=0.5).median * 1e3


def time_cuda(fn, graph=False):
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def cuda_copy_bandwidth(nbytes):
    """GB/s of a device copy of this many bytes (read + write counted), timed like the op."""
    x = torch.randn(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    return 2 * nbytes / (time_cuda(lambda: y.copy_(x)) * 1e-3) / 1e9


def transparent_hugepage_mode():
    """The kernel's THP setting, the bracketed word of "always [madvise] never"; None where it cannot be read."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            setting = handle.read()
    except OSError:
        return None
    return setting[setting.find("[") + 1:setting.find("]")] if "[" in setting else None


def machine(device):
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_available": ngd_ext.fused_available(device),
    }
    if device == "cpu":
        info["thp_mem_alloc_enable"] = os.environ.get("THP_MEM_ALLOC_ENABLE", "")
        info["transparent_hugepage"] = transparent_hugepage_mode()
        if info["fused_available"]:
            info["cpu_kernels"] = ngd_ext._C.cpu_kernel_variant()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def profile_shape(batch, dim, dtype, device, steps):
    """[(name, total_ms, calls)] for every kernel (CUDA) or op (CPU) that steps of forward + backward ran."""
    z, *rest = make_inputs(batch, dim, 25, 8, dtype, device)
    step = make_callables(ngd_ext.proto_dgeo_loss, z, rest)["fwdbwd"]
    for _ in range(3):  # warm-up: allocator, first launches
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        on_device = device == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA
        total_us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if total_us > 0 and (on_device or device != "cuda"):
            rows.append((event.key, total_us / 1e3, event.count))
    return sorted(rows, key=lambda row: -row[1])


def profile_main(args):
    """--profile: per shape, each kernel's share of a forward + backward of the fused op, printed and as JSON."""
    dtype = DTYPES[args.dtype[0]]
    report = {"machine": machine(args.device), "device": args.device, "dtype": args.dtype[0], "steps": args.steps,
              "shapes": []}
    for batch in args.batch:
        for dim in args.dim:
            rows = profile_shape(batch, dim, dtype, args.device, args.steps)
            total = sum(ms for _, ms, _ in rows)
            print(f"\nB={batch} D={dim} {args.dtype[0]} on {args.device}: {total / args.steps:.3f} ms of "
                  f"{'kernels' if args.device == 'cuda' else 'ops'} per forward + backward")
            print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  name")
            for name, ms, calls in rows[:12]:
                print(f"{ms / args.steps:9.3f} {ms / total:6.1%} {calls:6d}  {name[:100]}")
            report["shapes"].append({"batch": batch, "dim": dim, "ms_per_step": total / args.steps, "rows": [
                {"name": name, "ms_per_step": ms / args.steps, "calls": calls} for name, ms, calls in rows]})
    write_report(report, args.out or default_out(f"profile_{args.device}.json"))


def default_out(name):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def write_report(report, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(out + ".tmp", out)


def main():
    args = parse_args()
    device = args.device
    if args.profile or args.profile_plain:
        if not ngd_ext.fused_available(device):
            sys.exit(f"the fused op is not built for {device}: {ngd_ext.ops.BUILD_HINT}")
        if args.profile_plain:
            for batch in args.batch:
                for dim in args.dim:
                    z, *rest = make_inputs(batch, dim, 25, 8, DTYPES[args.dtype[0]], device)
                    step = make_callables(ngd_ext.proto_dgeo_loss, z, rest)["fwdbwd"]
                    for _ in range(args.steps):
                        step()
            return
        return profile_main(args)
    if "fused" in args.provider and not ngd_ext.fused_available(device):
        sys.exit(f"the fused op is not built for {device}: {ngd_ext.ops.BUILD_HINT}")
    served = ngd_ext.ops.cuda_kernels_serve(args.num_protos, args.num_classes)
    if "fused" in args.provider and device == "cuda" and not served:  # "fused" would time the reference
        sys.exit(f"the CUDA kernels serve at most {ngd_ext.ops.CUDA_MAX_PROTOS} prototypes and "
                 f"{ngd_ext.ops.CUDA_MAX_CLASSES} classes: --num-protos {args.num_protos}, --num-classes "
                 f"{args.num_classes} would time the reference as 'fused'")
    compiled_terms = torch.compile(reference.proto_dgeo_terms, dynamic=True if args.compile_dynamic else False)
    torch._dynamo.config.cache_size_limit = 256
    torch._functorch.config.donated_buffer = False  # the bwd mode replays one graph with retain_graph=True
    losses = {"fused": ngd_ext.proto_dgeo_loss, "eager": reference.proto_dgeo_terms, "compiled": compiled_terms}
    timer = time_cuda if device == "cuda" else time_cpu
    started = time.monotonic()
    results, skipped = [], []
    copy_gbps = {}
    for dtype_name in args.dtype:
        for batch in args.batch:
            for dim in args.dim:
                config = dict(dtype=dtype_name, batch=batch, dim=dim)
                if time.monotonic() - started > args.time_budget:
                    skipped.append(config)
                    continue
                z, *rest = make_inputs(batch, dim, args.num_protos, args.num_classes, DTYPES[dtype_name], device)
                z_bytes = z.numel() * z.element_size()
                if device == "cuda":
                    copy_gbps.setdefault(z_bytes, cuda_copy_bandwidth(max(z_bytes, 1 << 20)))
                for provider in args.provider:
                    callables = make_callables(losses[provider], z, rest)
                    for mode in args.mode:
                        if device == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                        ms = timer(callables[mode])
                        row = dict(config, provider=provider, mode=mode, ms=ms)
                        # bytes that must move: read z (fwd); read z, write dz (bwd)
                        moved = {"fwd": 1, "bwd": 2, "fwdbwd": 3}[mode] * z_bytes
                        row["gb_per_s"] = moved / (ms * 1e-3) / 1e9
                        if device == "cuda":
                            row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                            row["copy_gb_per_s"] = copy_gbps[z_bytes]
                            if provider == "fused" and mode == "fwd":
                                try:
                                    row["ms_cuda_graph"] = time_cuda(callables[mode], graph=True)
                                except RuntimeError as error:
                                    row["cuda_graph_error"] = str(error).splitlines()[0]
                        results.append(row)
                        print(json.dumps(row), flush=True)
                    del callables

    out = args.out or default_out(f"proto_dgeo_{device}.json")
    write_report(dict(machine=machine(device), device=device, num_protos=args.num_protos,
                      num_classes=args.num_classes, compile_dynamic=args.compile_dynamic, params=PARAMS,
                      results=results, skipped=skipped), out)
    print_table(results, device)
    print(f"\n{len(results)} timings, {len(skipped)} configurations skipped for time; JSON: {out}")


def print_table(results, device):
    index = {(r["dtype"], r["batch"], r["dim"], r["mode"], r["provider"]): r for r in results}
    keys = sorted({(r["dtype"], r["batch"], r["dim"], r["mode"]) for r in results},
                  key=lambda k: (k[0], k[1], k[2], MODES.index(k[3])))
    title = f"{'dtype':9} {'B':>6} {'D':>5} {'mode':7} {'fused ms':>9} {'eager ms':>9} {'compile ms':>10} " \
            f"{'x eager':>8} {'x compile':>9} {'fused GB/s':>10}"
    if device == "cuda":
        title += f" {'graph ms':>9} {'copy GB/s':>9}"
    print("\n" + title)
    for key in keys:
        fused, eager, compiled = (index.get(key + (p,)) for p in PROVIDERS)

        def cell(row, width, field="ms"):
            return f"{row[field]:{width}.3f}" if row and row.get(field) is not None else " " * (width - 1) + "-"

        def ratio(other):
            return f"{other['ms'] / fused['ms']:8.2f}" if fused and other else "       -"

        line = (f"{key[0]:9} {key[1]:6d} {key[2]:5d} {key[3]:7} {cell(fused, 9)} {cell(eager, 9)} "
                f"{cell(compiled, 10)} {ratio(eager)} {ratio(compiled):>9} {cell(fused, 10, 'gb_per_s')}")
        if device == "cuda":
            line += f" {cell(fused, 9, 'ms_cuda_graph')} {cell(fused, 9, 'copy_gb_per_s')}"
        print(line)


if __name__ == "__main__":
    main()
