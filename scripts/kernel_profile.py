"""Where the fused op's time goes, kernel by kernel: torch.profiler over forward + backward.

    python scripts/kernel_profile.py                      # CUDA when a GPU is present, else CPU
    python scripts/kernel_profile.py --batch 65536 --dim 2048 --out profile.json
    ncu -k regex:forward_rows python scripts/kernel_profile.py --batch 65536 --dim 2048 --steps 1 --plain

Prints, per shape, each kernel's (CUDA) or op's (CPU) total and mean time and its share, and writes them as
JSON. The benchmark says how fast the op is; this says which of its kernels to work on.
"""

import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ngd_ext  # noqa: E402
from benchmarks.bench_proto_dgeo import make_callables, make_inputs  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[8192, 65536], help="batch sizes B")
    parser.add_argument("--dim", type=int, nargs="+", default=[512, 2048], help="embedding widths D")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--steps", type=int, default=10, help="profiled forward + backward steps per shape")
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    parser.add_argument("--plain", action="store_true",
                        help="run the steps without torch.profiler, for an outside profiler such as ncu")
    return parser.parse_args()


def profile_shape(batch, dim, dtype, device, steps):
    """[(name, total_ms, calls)] for every kernel (CUDA) or op (CPU) that steps of forward + backward ran."""
    z, *rest = make_inputs(batch, dim, 25, 8, getattr(torch, dtype), device)
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
        if device == "cuda":
            total_us = event.self_device_time_total
            if total_us <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            total_us = event.self_cpu_time_total
            if total_us <= 0:
                continue
        rows.append((event.key, total_us / 1e3, event.count))
    return sorted(rows, key=lambda row: -row[1])


def main():
    args = parse_args()
    if not ngd_ext.fused_available(args.device):
        sys.exit(f"the fused op is not built for {args.device}: pip install --no-build-isolation -e .")
    if args.plain:
        for batch in args.batch:
            for dim in args.dim:
                z, *rest = make_inputs(batch, dim, 25, 8, getattr(torch, args.dtype), args.device)
                step = make_callables(ngd_ext.proto_dgeo_loss, z, rest)["fwdbwd"]
                for _ in range(args.steps):
                    step()
        return
    report = {"device": args.device, "dtype": args.dtype, "steps": args.steps, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "shapes": []}
    for batch in args.batch:
        for dim in args.dim:
            rows = profile_shape(batch, dim, args.dtype, args.device, args.steps)
            total = sum(ms for _, ms, _ in rows)
            print(f"\nB={batch} D={dim} {args.dtype} on {args.device}: {total / args.steps:.3f} ms of "
                  f"{'kernels' if args.device == 'cuda' else 'ops'} per forward + backward")
            print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  name")
            for name, ms, calls in rows[:12]:
                print(f"{ms / args.steps:9.3f} {ms / total:6.1%} {calls:6d}  {name[:100]}")
            report["shapes"].append({"batch": batch, "dim": dim, "ms_per_step": total / args.steps, "rows": [
                {"name": name, "ms_per_step": ms / args.steps, "calls": calls} for name, ms, calls in rows]})
    if args.out:
        with open(args.out + ".tmp", "w") as handle:
            json.dump(report, handle, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
