"""Benchmark: stage 3's training step against a plain torchvision training loop, in images per second.

    python benchmarks/bench_training.py                                # resnet18 at 48 px, on cuda when present
    python benchmarks/bench_training.py --arch resnet18 resnet50 --size 48 112 224 --compile --out bench.json

Variants are timed in turn, round after round, and the median round counts: on a shared machine the speed drifts.

For each backbone and input size it times, on random faces of a fixed seed:
  plain  a plain loop with the same backbone, a classifier on its pooled features, the same batch, size and precision:
         CE, AdamW, gradient clipping, the loss read back every step; its inputs come ready-made, as from a DataLoader
  B0     stage 3's own training step (stage3_student.training_step, with its augmentation, loss and scheduler), CE only
  B3     the same with logit KD from a teacher (the student's architecture at its size, unless --teacher-arch), Proto-KD
         and D-Geo at full weight (the ramp's end)
and, with --compile, each of them again through torch.compile. "recipe h" projects the paper's recipe, 100 epochs of
FERPlus's 28,709 training images, at that speed. Each stage-3 step is then split into its parts, each timed alone on
the same batch: the augmentation, the student's forward and backward, the KD teacher's forward, the fused Proto-KD +
D-Geo op (forward and backward) and the optimizer (clipping and AdamW); "other" is the rest (CE, KD, the scheduler,
the host sync that reads the loss). The teacher is timed with the student's graph held, as in a step: alone, with all
the memory to itself, it runs faster than it does there (ResNet-50 at 112 px on the CPU: by a quarter). Prints a table
and writes JSON with the machine and versions.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import stage3_student  # noqa: E402
from bench_proto_dgeo import machine, write_report  # noqa: E402
from ngd_ext import artifacts  # noqa: E402
from ngd_ext.emotions import FER_CLASSES  # noqa: E402
from ngd_ext.student_model import Student, backbone, preprocess  # noqa: E402

VARIANTS = ("plain", "B0", "B3")
PARTS = ("augment", "student fwd+bwd", "teacher fwd", "fused op", "optimizer")
EMBEDDING = 128  # the prototype width of the official release
RECIPE_IMAGES = 100 * 28_709  # the paper's recipe: 100 epochs of FERPlus's training images


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", nargs="+", default=["resnet18"], help="backbones (stage 3's --arch names)")
    parser.add_argument("--size", type=int, nargs="+", default=[48], help="input sizes in pixels")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--teacher-arch", help="the KD teacher's backbone (default: the student's)")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="precision, as stage 3's --amp (auto: bf16 on recent GPUs, float32 on the CPU)")
    parser.add_argument("--compile", action="store_true", help="also time every variant through torch.compile")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round (default 4)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds, each timing every variant in turn; the median round counts (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3; compiling takes them)")
    parser.add_argument("--no-parts", action="store_true", help="time whole steps only")
    parser.add_argument("--out", help="JSON file to write")
    return parser.parse_args(argv)


def make_bank(run_dir, seed=0):
    """A stage-2 folder in run_dir with a random unit-norm 5 x 5 bank of EMBEDDING, as stage 3 reads it."""
    stage2 = os.path.join(run_dir, "stage2")
    os.makedirs(stage2)
    bank = np.random.default_rng(seed).normal(size=(25, EMBEDDING))
    np.savez(os.path.join(stage2, "prototypes.npz"), bank=bank / np.linalg.norm(bank, axis=1, keepdims=True), G=5,
             filled_from=np.arange(25))
    artifacts.write_manifest(stage2)


class Stage3Step:
    """Stage 3's training step as stage 3 builds it (its args, loss, student, optimiser and batches), on random
    faces; run(i) takes global batch i through stage3_student.training_step."""

    def __init__(self, variant, arch, size, batch, device, amp="auto", compile=False, teacher_arch=None, run_dir=None):
        self.device = torch.device(device)
        run_dir = run_dir or tempfile.mkdtemp(prefix="bench_training_")
        if not os.path.exists(os.path.join(run_dir, "stage2")):
            make_bank(run_dir)
        flags = ["--run-dir", run_dir, "--variant", variant, "--arch", arch, "--input-size", str(size),
                 "--batch-size", str(batch), "--device", device, "--amp", amp]
        if variant == "B3":  # every term at full weight (the ramp's end); the teacher is built below, not read
            flags += ["--kd-teacher", "unused.pt", "--ramp-start", "0", "--ramp-end", "0"]
        self.args = stage3_student.parse_args(flags + (["--compile"] if compile else []))
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (4 * batch, 48, 48), dtype=torch.uint8, generator=generator)
        labels = torch.arange(4 * batch) % len(FER_CLASSES)
        self.loss_fn, facts = stage3_student.build_loss(self.args, labels.numpy(), self.device)
        self.model, self.trained = stage3_student.build_student(self.args, facts["embedding_size"], self.device, 1)
        self.state = stage3_student.optimisation(self.args, self.model, self.device, steps_per_epoch=1000)
        self.autocast = stage3_student.autocast_settings(stage3_student.mixed_precision(amp, self.device), self.device)
        self.batches = stage3_student.Batches(images.to(self.device), labels.to(self.device), None, 0, 1)
        self.teacher = None
        if variant == "B3":
            torch.manual_seed(1)
            teacher = Student(teacher_arch or arch, len(FER_CLASSES), facts["embedding_size"], size).to(self.device)
            teacher = teacher.to(memory_format=torch.channels_last) if self.device.type == "cuda" else teacher
            self.teacher = (torch.compile(teacher.eval()) if compile else teacher.eval(), size)

    def batch(self, i):
        return torch.arange(len(self.batches.labels)).roll(-(i % 4) * self.args.batch_size)[:self.args.batch_size]

    def run(self, i):
        return stage3_student.training_step(self.state, self.trained, self.teacher, self.batches, self.batch(i), i,
                                            self.args, self.loss_fn, self.autocast)

    def parts(self):
        """{part: a callable that runs that part of a step alone, on batch 0}."""
        x = self.batches.network_input(self.batch(0), 0, self.args.input_size)
        y = self.batches.labels[self.batch(0)]
        z = torch.randn(len(y), EMBEDDING, device=self.device, requires_grad=True)

        def student():
            with torch.autocast(**self.autocast):
                logits, embedding = self.trained(x)
            (logits.float().logsumexp(1).mean() + embedding.float().square().mean()).backward()

        def teacher():  # timed with the student's graph held, as in a step: the two compete for memory there
            with torch.autocast(**self.autocast):
                held = self.trained(x)
            synchronize(self.device)
            started = time.perf_counter()
            with torch.autocast(**self.autocast), torch.no_grad():
                self.teacher[0](x)
            synchronize(self.device)
            del held
            return time.perf_counter() - started

        def fused():
            sum(self.loss_fn.proto_dgeo(z, y)).backward()

        def optimizer():
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.state.optimizer.step()

        student()  # gradients for the optimizer's step
        parts = {"augment": lambda: self.batches.network_input(self.batch(0), 0, self.args.input_size),
                 "student fwd+bwd": student, "optimizer": optimizer}
        if self.args.proto_weight > 0 or self.args.dgeo_weight > 0:
            parts["fused op"] = fused
        if self.teacher is not None:
            parts["teacher fwd"] = teacher
        return parts


class PlainStep:
    """A plain torchvision loop's step: the same backbone with a classifier, CE, AdamW, clipping; ready inputs."""

    def __init__(self, arch, size, batch, device, amp="auto", compile=False):
        self.device = torch.device(device)
        torch.manual_seed(0)
        features, width, _ = backbone(arch, size)
        model = nn.Sequential(features, nn.Flatten(), nn.Linear(width, len(FER_CLASSES))).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model, self.trained = model, torch.compile(model) if compile else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.05)
        self.autocast = stage3_student.autocast_settings(stage3_student.mixed_precision(amp, self.device), self.device)
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (4, batch, 48, 48), dtype=torch.uint8, generator=generator).to(self.device)
        self.inputs = [preprocess(group, size) for group in images]
        if self.device.type == "cuda":
            self.inputs = [x.contiguous(memory_format=torch.channels_last) for x in self.inputs]
        self.labels = (torch.arange(batch) % len(FER_CLASSES)).to(self.device)

    def run(self, i):
        with torch.autocast(**self.autocast):
            loss = F.cross_entropy(self.trained(self.inputs[i % 4]).float(), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()

    def parts(self):
        def student():
            with torch.autocast(**self.autocast):
                loss = F.cross_entropy(self.trained(self.inputs[0]).float(), self.labels)
            loss.backward()

        def optimizer():
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()

        student()
        return {"student fwd+bwd": student, "optimizer": optimizer}


def seconds_per_call(function, device, calls, first=0):
    """The mean wall time of function(first) ... function(first + calls - 1), the device synchronised around them."""
    synchronize(device)
    started = time.perf_counter()
    for i in range(first, first + calls):
        function(i)
    synchronize(device)
    return (time.perf_counter() - started) / calls


def part_seconds(part, device):
    """One call of a part, timed; a part that must set something up first times itself and returns its seconds."""
    synchronize(device)
    started = time.perf_counter()
    own = part()
    synchronize(device)
    return own if isinstance(own, float) else time.perf_counter() - started


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(steps, args):
    """{variant: {images_per_s, step_ms, recipe_minutes, parts_ms: {part: ms}}}. Every variant is warmed up, then
    timed in turn, round after round, so that the drift of a shared machine falls on each alike; the median round
    counts. A part's time is the median of single calls."""
    for step in steps.values():
        seconds_per_call(step.run, args.device, args.warmup)
    rounds = {variant: [] for variant in steps}
    for round_index in range(args.rounds):
        for variant, step in steps.items():
            first = args.warmup + round_index * args.steps
            rounds[variant].append(seconds_per_call(step.run, args.device, args.steps, first))
    results = {}
    for variant, step in steps.items():
        step_s = statistics.median(rounds[variant])
        results[variant] = {"images_per_s": args.batch / step_s, "step_ms": 1e3 * step_s,
                            "recipe_minutes": RECIPE_IMAGES * step_s / args.batch / 60}
        if not args.no_parts:
            results[variant]["parts_ms"] = {
                name: 1e3 * statistics.median(part_seconds(part, args.device) for _ in range(args.steps * args.rounds))
                for name, part in step.parts().items()}
    return results


def build(variant, arch, size, args, compile):
    if variant == "plain":
        return PlainStep(arch, size, args.batch, args.device, args.amp, compile)
    return Stage3Step(variant, arch, size, args.batch, args.device, args.amp, compile, args.teacher_arch)


def summarise(rows):
    """The goals' figures per (arch, size, compile): B0's images/s over the plain loop's, and B3's step time beyond
    B0's and its teacher's forward, over B0's step time."""
    goals = []
    for row in rows:
        if row["variant"] != "B0":
            continue
        key = (row["arch"], row["size"], row["compile"])
        others = {other["variant"]: other for other in rows if (other["arch"], other["size"], other["compile"]) == key}
        goal = {"arch": row["arch"], "size": row["size"], "compile": row["compile"]}
        if "plain" in others:
            goal["b0_over_plain"] = row["images_per_s"] / others["plain"]["images_per_s"]
        b3 = others.get("B3")
        if b3 and "parts_ms" in b3:
            beyond = b3["step_ms"] - row["step_ms"] - b3["parts_ms"]["teacher fwd"]
            goal["b3_overhead_beyond_teacher"] = beyond / row["step_ms"]
        goals.append(goal)
    return goals


def print_table(rows, goals):
    print(f"{'arch':<20}{'size':>5}{'compile':>8}{'variant':>8}{'images/s':>10}{'step ms':>9}{'recipe h':>9}  "
          + "".join(f"{part:>16}" for part in (*PARTS, "other")))
    for row in rows:
        parts = row.get("parts_ms", {})
        shares = [parts[part] / row["step_ms"] if part in parts else None for part in PARTS]
        other = 1 - sum(share for share in shares if share is not None) if parts else None
        cells = "".join(f"{'-' if share is None else f'{share:.0%}':>16}" for share in (*shares, other))
        print(f"{row['arch']:<20}{row['size']:>5}{'yes' if row['compile'] else 'no':>8}{row['variant']:>8}"
              f"{row['images_per_s']:>10.0f}{row['step_ms']:>9.1f}{row['recipe_minutes'] / 60:>9.1f}  {cells}")
    for goal in goals:
        figures = []
        if "b0_over_plain" in goal:
            figures.append(f"B0 at {goal['b0_over_plain']:.0%} of the plain loop's images/s")
        if "b3_overhead_beyond_teacher" in goal:
            figures.append(f"B3 {goal['b3_overhead_beyond_teacher']:+.1%} of B0's step beyond its teacher's forward")
        print(f"{goal['arch']} at {goal['size']} px{' compiled' if goal['compile'] else ''}: " + "; ".join(figures))


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for arch in args.arch:
        for size in args.size:
            for compile in ([False, True] if args.compile else [False]):
                torch._dynamo.reset()
                steps = {variant: build(variant, arch, size, args, compile) for variant in args.variant}
                results = measure(steps, args)
                for variant, result in results.items():
                    rows.append({"arch": arch, "size": size, "batch": args.batch, "compile": compile,
                                 "variant": variant, **result})
                print(f"{arch} {size} px{' compiled' if compile else ''}: " + ", ".join(
                    f"{variant} {result['images_per_s']:.0f}" for variant, result in results.items()) + " images/s",
                    file=sys.stderr)
    goals = summarise(rows)
    print_table(rows, goals)
    if args.out:
        write_report({"command": " ".join(["python", *sys.argv]), "device": args.device, "amp": args.amp,
                      "machine": machine(torch.device(args.device).type), "rows": rows, "goals": goals}, args.out)


if __name__ == "__main__":
    main()
