"""How many instructions the fused op's two row kernels issue per step of columns, per prototype copy and per pass of
their other loop over z, read off their SASS: a measure of the kernels that needs nvcc but no GPU.

    python scripts/sass_counts.py                  # sm_90, table on stdout
    python scripts/sass_counts.py --out sass.json
    python scripts/sass_counts.py --source ../other-checkout/csrc/cuda/proto_dgeo_cuda.cu

Compiles csrc/cuda/proto_dgeo_cuda.cu to a cubin with the build's nvcc flags, disassembles it (cuobjdump, from
the CUDA toolkit or the copy that triton carries) and, for every instantiation of forward_rows_kernel and
backward_kernel, finds the innermost loop around the tensor-core instructions (HMMA): one step of the kernel's
columns. It reports, with ptxas's registers and spills:

- loop: the loop's instructions over all its paths (more than a step issues: the loop also holds the staging of
  prototype chunks, taken once per chunk);
- span: from the first HMMA's basic block to the last one's (less than a step issues: the next columns' loads and
  the L2 prefetches lie outside it);
- tail: from the loop's last barrier to its end (the path of a step that stages no prototypes, with its rarely taken
  branches counted in);
- hmma: the loop's HMMA;
- copy: the instructions per 16-byte copy of the loops inside it that stage prototype chunks (a thread's share of a
  chunk is chunk x KMAX x 4 bytes / 16 / 256 copies: 16 at KMAX = 32 in float32 with D > 1024, once per 4 steps);
- pass: the loop of the kernel's other pass over z: in the forward the class sums, a thread's 4 columns of 16 rows,
  tile rows / 16 x ceil(D / 1024) times per tile; in the backward the first pass, 4 steps of a warp's 4 rows.

Fewer instructions is not a speed-up by itself, but the row kernels issue one step per 512 elements of z per warp,
with two warps per scheduler, and on an H200 at large B and D they wait on the latency between their instructions
more than on memory (docs/benchmarks.md).
"""

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "proto_dgeo_cuda.cu")
KERNELS = ("forward_rows_kernel", "backward_kernel")
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90", help="the GPU architecture to compile for (default sm_90)")
    parser.add_argument("--source", default=SOURCE,
                        help="the .cu to read (default: this checkout's; another checkout's, to compare two commits)")
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    return parser.parse_args()


def tool(name):
    """The path of a CUDA tool: under CUDA_HOME, on PATH, or (cuobjdump) the copy in triton's wheel."""
    for root in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/opt/cuda")):
        if os.access(os.path.join(root, "bin", name), os.X_OK):
            return os.path.join(root, "bin", name)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    triton = importlib.util.find_spec("triton")
    if triton is not None:
        bundled = os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    sys.exit(f"sass_counts: no {name} found (set CUDA_HOME to the CUDA toolkit's root)")


def compile_cubin(source, arch, cubin):
    """ptxas's -v report of compiling the .cu to cubin with the extension's own flags."""
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    command = [tool("nvcc"), "-std=c++20", "-O3", f"-arch={arch}", "-cubin", "-Xptxas", "-v", *includes,
               f"-I{sysconfig.get_paths()['include']}", *cpp_extension.COMMON_NVCC_FLAGS, source, "-o", cubin]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"sass_counts: nvcc failed:\n{result.stderr[-4000:]}")
    return result.stderr


def demangle(names):
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, result.stdout.splitlines()))


def functions(sass):
    """{mangled name: [(address, instruction text)]} of every function in cuobjdump -sass output."""
    listing, current = {}, None
    for line in sass.splitlines():
        if "Function :" in line:
            current = listing.setdefault(line.split("Function :")[1].strip(), [])
        elif current is not None and (match := INSTRUCTION.match(line)):
            current.append((int(match.group(1), 16), match.group(2)))
    return listing


def opcode(text):
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def step_counts(instructions):
    """The innermost loop holding the first HMMA: its instructions over all paths, the span of basic blocks from its
    first HMMA to its last, its tail after its last barrier, its HMMA, the instructions per prototype copy of the
    loops inside it that stage prototypes (the most of them; None where it has none), and the loop of the kernel's
    other pass over z (other_pass). None where a kernel has no HMMA."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    products = [i for i, (_, text) in enumerate(instructions) if opcode(text) == "HMMA"]
    if not products:
        return None
    targets, loops = set(), []
    for i, (address, text) in enumerate(instructions):
        target = BRANCH_TARGET.search(text)
        head = index.get(int(target.group(1), 16)) if target else None
        if head is not None:
            targets.add(head)
            if head <= i:
                loops.append((i - head, head, i))
    _, head, back = min(loop for loop in loops if loop[1] <= products[0] <= loop[2])
    in_loop = [i for i in products if head <= i <= back]
    start, end = in_loop[0], in_loop[-1]
    while start not in targets and opcode(instructions[start - 1][1]) != "BRA":
        start -= 1
    while opcode(instructions[end][1]) != "BRA" and end + 1 not in targets:
        end += 1
    barriers = [i for i in range(head, back + 1) if opcode(instructions[i][1]) == "BAR"]
    tail = back - (barriers[-1] if barriers else head - 1)
    per_copy = []
    for _, copy_head, copy_back in loops:
        if head <= copy_head and copy_back < back:
            # A copy that may zero-fill is two LDGSTS under opposite predicates, one of them with the ignore-source
            # operand !PT: the other one counts the copy.
            copies = sum(opcode(text) == "LDGSTS" and "!PT" not in text
                         for _, text in instructions[copy_head:copy_back + 1])
            if copies:
                per_copy.append((copy_back - copy_head + 1) / copies)
    return {"loop": back - head + 1, "span": end - start + 1, "tail": tail, "hmma": len(in_loop),
            "copy": max(per_copy) if per_copy else None, "pass": other_pass(instructions, loops)}


def other_pass(instructions, loops):
    """The instructions of the innermost loop of the kernel's other pass over z: the one that loads from global memory
    and does float arithmetic (16 FFMA or more) without the tensor cores. None where there is none."""
    lengths = []
    for length, head, back in loops:
        ops = [opcode(text) for _, text in instructions[head:back + 1]]
        if "LDG" in ops and ops.count("FFMA") >= 16 and "HMMA" not in ops:
            lengths.append(length + 1)
    return min(lengths) if lengths else None


def ptxas_resources(report):
    """{mangled name: (registers, spill bytes stored)} from ptxas -v."""
    resources = {}
    for block in report.split("Compiling entry function '")[1:]:
        name = block.split("'", 1)[0]
        registers = re.search(r"Used (\d+) registers", block)
        spills = re.search(r"(\d+) bytes spill stores", block)
        resources[name] = (int(registers.group(1)) if registers else None, int(spills.group(1)) if spills else 0)
    return resources


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cubin = os.path.join(scratch, "proto_dgeo.cubin")
        report = compile_cubin(args.source, args.arch, cubin)
        sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    listing = {name: body for name, body in functions(sass).items() if any(kernel in name for kernel in KERNELS)}
    names = demangle(list(listing))
    resources = ptxas_resources(report)
    rows = []
    for name, body in listing.items():
        counts = step_counts(body)
        if counts is None:
            continue
        registers, spills = resources.get(name, (None, 0))
        signature = re.sub(r"\(anonymous namespace\)::|ngd_ext::|c10::", "", names[name]).split(">(")[0] + ">"
        rows.append(dict(kernel=signature, registers=registers, spill_bytes=spills, **counts))
    rows.sort(key=lambda row: row["kernel"])
    print(f"{'kernel <scalar, acc, KMAX, M tiles, aligned>':58} {'regs':>5} {'spill':>6} {'loop':>5} {'span':>5} "
          f"{'tail':>5} {'hmma':>5} {'copy':>5} {'pass':>5}")
    for row in rows:
        copy = "-" if row["copy"] is None else f"{row['copy']:.1f}"
        print(f"{row['kernel']:58} {row['registers']:5} {row['spill_bytes']:6} {row['loop']:5} {row['span']:5} "
              f"{row['tail']:5} {row['hmma']:5} {copy:>5} {row['pass'] or '-':>5}")
    if args.out:
        with open(args.out + ".tmp", "w") as handle:
            json.dump(dict(arch=args.arch, source=os.path.abspath(args.source), kernels=rows), handle, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
