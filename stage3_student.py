"""Stage 3: the FERPlus student, trained with CE + logit KD + Proto-KD + D-Geo (SPEC section 4).

Reads FERPlus (--ferplus DIR: fer2013.csv + fer2013new.csv, or the FER2013{Train,Valid,Test} folders) or, with
no --ferplus, the embedded synthetic default; and stage 2's prototype bank, after checking it against stage 2's
manifest. Writes RUN_DIR/stage3/data_summary.json and RUN_DIR/stage3/<name>/:

  best.pt         state_dict + config of the epoch with the best FERPlus-valid macro-F1
  last.pt         the same of the last epoch
  history.jsonl   one line per epoch: every loss term, raw and weighted, and its gradient's share against CE's;
                  valid accuracy, macro-F1, bACC, learning rate, images/s (and with --amp fp16 the gradient
                  scaler's loss scale)
  curves.png      the weighted terms, their gradient shares and the valid scores per epoch
  config.json, SHA256SUMS

Presets: B0 = CE; B1 = CE + KD; B2 = B1 + Proto-KD; B3 = B2 + D-Geo (the full model); every weight can be
overridden. KD needs a visual teacher: a best.pt of another stage-3 run. The two-step recipe:

    python stage3_student.py --variant B0 --name kd_teacher
    python stage3_student.py --variant B3 --kd-teacher runs/demo/stage3/kd_teacher/best.pt

On the embedded default, epochs and the D-Geo ramp default to a short schedule (see --help); with real data to
the paper's. More processes: torchrun --nproc_per_node=N stage3_student.py ... (DDP; NCCL on GPUs, gloo on
CPU): each process runs the network on its share of the global batch, and every loss term is taken over the
whole global batch, as one process takes it; on GPUs, --sync-bn takes BatchNorm's statistics over it too. A run
works in stage3/<name>.partial/ and replaces stage3/<name>/ only once it has finished, so a rerun that fails leaves
the previous student whole; killed at any moment, it continues with --resume from its last checkpoint there. A
second run of the same name, while the first lives, stops at once. On GPUs, --deterministic makes a run repeat
bit for bit (on CPU it does anyway). history.jsonl and curves.png are rewritten after every epoch, and --tensorboard
logs the same to RUN_DIR/tensorboard/<name>/.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ngd_ext import artifacts, cli
from ngd_ext.augment import augment
from ngd_ext.data.ferplus import FerPlusError, data_summary, load_ferplus_cached
from ngd_ext.data.synthetic_faces import FERPLUS_SIZES, synthetic_ferplus
from ngd_ext.emotions import DEFAULT_ANCHORS, DEFAULT_POSITIVE, FER_CLASSES
from ngd_ext.metrics import eight_way
from ngd_ext.report import plot_curves
from ngd_ext.runtime import gather_rows, gathered_order, set_determinism
from ngd_ext.student_loss import (CLASS_WEIGHTINGS, INERT_SHARE, KD_TEMPERATURE, LABEL_SMOOTHING, TERMS, ProtoDGeoLoss,
                                  StudentLoss, class_weights, dgeo_ramp, gradient_shares)
from ngd_ext.student_model import (ARCHITECTURES, EXECUTION_SETTINGS, Student, check_architecture,
                                   load_backbone_weights, load_student, predict)

# Defaults ---------------------------------------------------------------------------------------------------
RUN_DIR = "runs/demo"
PRESETS = {  # weights of KD, Proto-KD and D-Geo
    "B0": (0.0, 0.0, 0.0), "B1": (0.30, 0.0, 0.0), "B2": (0.30, 0.12, 0.0), "B3": (0.30, 0.12, 0.012)}
SCHEDULES = {  # epochs, D-Geo ramp start and end (epochs), input size: the official release's on FERPlus
    "ferplus": dict(epochs=100, ramp_start=20, ramp_end=60, input_size=224),
    "synthetic": dict(epochs=6, ramp_start=1, ramp_end=4, input_size=48),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=RUN_DIR, help=f"run folder holding stage2/ (default {RUN_DIR})")
    parser.add_argument("--ferplus", help="FERPlus folder (default: the embedded synthetic faces)")
    cli.add_synthetic_flags(parser, FERPLUS_SIZES, "the embedded synthetic faces")
    parser.add_argument("--variant", choices=sorted(PRESETS), default="B3", help="loss preset (default B3)")
    parser.add_argument("--name", type=cli.run_name, help="output folder under stage3/ (default: the variant)")
    parser.add_argument("--arch", default="resnet18", metavar="{" + ",".join(ARCHITECTURES) + ",timm:NAME}",
                        help="backbone: a torchvision classification model (default resnet18; vit_b_16 takes an "
                             "--input-size that is a multiple of 16), or timm:NAME, one of timm's where it is "
                             "installed")
    parser.add_argument("--input-size", type=int,
                        help="image side fed to the network (default 224 on FERPlus, its 48 x 48 faces upsampled as "
                             "the official evaluation runs them; 48 on the synthetic default)")
    parser.add_argument("--pretrained", help="local state_dict file for the backbone (never downloaded; its SHA-256 "
                                             "goes into config.json)")
    parser.add_argument("--kd-teacher", help="best.pt of another stage-3 run, the logit-KD teacher")
    parser.add_argument("--kd-loss", choices=("mse", "kl"),
                        help="logit KD: the mean squared difference of the raw logits (mse, the default), or T^2 "
                             "KL(teacher || student) of the softmaxes at --kd-temperature (kl)")
    parser.add_argument("--kd-temperature", type=cli.positive,
                        help=f"T of --kd-loss kl (default {KD_TEMPERATURE:g}; the paper's Full (T=1) row: 1)")
    parser.add_argument("--kd-weight", type=cli.non_negative, help="override the preset's KD weight")
    parser.add_argument("--proto-weight", type=cli.non_negative, help="override the preset's Proto-KD weight")
    parser.add_argument("--dgeo-weight", type=cli.non_negative, help="override the preset's D-Geo weight")
    parser.add_argument("--tau", type=cli.positive, default=0.9, help="Proto-KD temperature (default 0.9)")
    parser.add_argument("--var-cap", type=cli.non_negative, default=0.2, help="D-Geo variance cap (default 0.2)")
    parser.add_argument("--margin", type=cli.non_negative, default=0.5, help="D-Geo inter-class margin (default 0.5)")
    parser.add_argument("--class-weights", type=cli.class_weighting, default="sqrt-inverse",
                        metavar="{" + ",".join(CLASS_WEIGHTINGS) + "} or W,W,...",
                        help="CE's class weights: (1/n_c)^0.5 (sqrt-inverse, the default) or 1/n_c (inverse), each "
                             "normalised to mean 1; none; or 8 numbers in FERPlus's class order")
    parser.add_argument("--training-labels", choices=("majority", "probability"), default="majority",
                        help="FERPlus training targets: the official majority rule's class (default), or the votes' "
                             "distribution (probability rule); valid and test always use the majority rule")
    parser.add_argument("--epochs", type=int, help="epochs (default 100 on FERPlus, 6 on the synthetic default)")
    parser.add_argument("--ramp-start", type=int, help="first epoch of the D-Geo ramp (default 20; synthetic 1)")
    parser.add_argument("--ramp-end", type=int,
                        help="epoch at which the D-Geo ramp reaches 1 (default 60; synthetic 4)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    parser.add_argument("--lr", type=cli.positive, default=2e-4, help="AdamW learning rate (default 2e-4)")
    parser.add_argument("--weight-decay", type=cli.non_negative, default=0.05, help="AdamW weight decay (default 0.05)")
    parser.add_argument("--warmup-epochs", type=cli.non_negative, default=1.0,
                        help="linear warmup before the cosine (default 1)")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="steps between resume checkpoints (default 50; one also ends each epoch)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this run")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also log every epoch's loss terms, gradient shares and valid scores as TensorBoard event "
                             "files, in RUN_DIR/tensorboard/<name>/ (needs the tensorboard package)")
    parser.add_argument("--device", type=cli.device, default=cli.default_device(),
                        help="torch device (default cuda when available); under torchrun, each process's GPU")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="mixed precision: auto (default) is bf16 on GPUs of compute capability 8.0 on (A100, "
                             "H100, RTX 30xx on), fp16 with a gradient scaler on older ones (V100, T4), and off, "
                             "float32 throughout, on the CPU")
    parser.add_argument("--sync-bn", action="store_true",
                        help="BatchNorm statistics over the global batch under torchrun (GPUs only), as one process")
    parser.add_argument("--compile", action="store_true",
                        help="run the student and the KD teacher through torch.compile (checkpoints stay plain "
                             "state_dicts; the first steps pay the compile; docs/benchmarks.md has what it gains)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU algorithms only, so that a run repeats bit for bit (default: cuDNN's "
                             "fastest; CPU runs repeat either way)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model, the batch order and the augmentation (default 0); students of "
                             "several seeds train on the same faces")
    args = parser.parse_args(argv)
    settle_defaults(parser, args)
    check_settings(parser, args)
    return args


def settle_defaults(parser, args):
    """The schedule of the data (the official release's on FERPlus, a short one on the synthetic default) and the
    preset's weights, where no flag set them."""
    cli.settle_synthetic_flags(parser, args, ["--ferplus"])
    defaults = {**SCHEDULES["synthetic" if args.ferplus is None else "ferplus"],
                **dict(zip(("kd_weight", "proto_weight", "dgeo_weight"), PRESETS[args.variant]))}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or args.variant


def check_settings(parser, args):
    """Usage errors: KD without a teacher, KD settings that would go unused, and sizes out of range."""
    if args.kd_weight > 0 and not args.kd_teacher:
        parser.error(f"--variant {args.variant} uses logit KD (weight {args.kd_weight}): give --kd-teacher (a "
                     "stage-3 best.pt, e.g. of a B0 run) or --kd-weight 0")
    for flag, value, what in (("--kd-teacher", args.kd_teacher, "teacher"), ("--kd-loss", args.kd_loss, "KD loss"),
                              ("--kd-temperature", args.kd_temperature, "temperature")):
        if value and args.kd_weight == 0:
            parser.error(f"{flag} {value}: the logit-KD weight is 0 (--variant {args.variant}"
                         f"{', --kd-weight 0' if args.variant != 'B0' else ''}), so the {what} would go unused; leave "
                         "it out, or give a positive --kd-weight")
    args.kd_loss = args.kd_loss or "mse"
    if args.kd_temperature is not None and args.kd_loss == "mse":
        parser.error(f"--kd-temperature {args.kd_temperature:g}: --kd-loss mse matches the raw logits, with no "
                     "temperature; give --kd-loss kl to distil softened softmaxes")
    args.kd_temperature = args.kd_temperature or KD_TEMPERATURE
    if args.sync_bn and not args.device.startswith("cuda"):
        parser.error(f"--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on {args.device!r})")
    problem = check_architecture(args.arch, args.input_size)
    if problem:
        parser.error(f"--arch {args.arch}: {problem}")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        parser.error("--tensorboard writes TensorBoard's event files, and needs its package: pip install tensorboard")
    if args.epochs < 1 or args.batch_size < 2 or args.checkpoint_every < 1 or args.input_size < 16:
        parser.error("--epochs and --checkpoint-every must be at least 1, --batch-size at least 2 (BatchNorm needs two "
                     "images per step), --input-size at least 16")


def mixed_precision(choice, device):
    """The autocast dtype of --amp on this device, or None for float32 throughout. Older GPUs have no bfloat16
    arithmetic of their own, and float16's narrow range needs a gradient scaler."""
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[choice]


def gradient_scaler(device, precision):
    """torch's loss scaler for float16, or one whose calls pass straight through. It skips a step whose gradients
    overflow, the first one too, and the learning-rate schedule counts that step all the same: torch's warning that
    the scheduler then stepped before the optimizer points at nothing wrong, and is not shown."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    if scaler.is_enabled():
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`"))
    return scaler


def learning_rate_factor(step, warmup_steps, total_steps):
    """The learning rate's multiplier at a step: a linear warmup, then a cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(total_steps - warmup_steps, 1)))


def check_batch_share(batch_size, world):
    """Each of the world processes takes an equal share of every global batch, of two images at least: BatchNorm,
    which normalises over each process's share, cannot train on one image."""
    if batch_size % world or batch_size // world < 2:
        raise ValueError(f"--batch-size {batch_size} must divide among the {world} processes, at least 2 images each "
                         f"(BatchNorm needs two per step in every process)")


def load_teacher(path, device):
    """The logit-KD teacher, a best.pt of a finished stage-3 run, checked against that run's manifest; returns
    (model, the input size it was trained at, the SHA-256 of the file loaded)."""
    if not os.path.isfile(path):
        raise artifacts.ArtifactError(f"--kd-teacher {path}: no such file (expected another stage-3 run's best.pt)")
    folder, name = os.path.split(os.path.abspath(path))
    try:
        sha256 = artifacts.verify_manifest(folder, [name])[name]
        model, config = load_student(path, len(FER_CLASSES))
        return model.to(device), config["input_size"], sha256
    except artifacts.ArtifactError as error:
        raise artifacts.ArtifactError(f"--kd-teacher: {error}") from error
    except ValueError as error:
        raise ValueError(f"--kd-teacher {error}") from error


def warn_of_inert_terms(epoch, weights):
    """After the first epoch, name on stderr each term with a weight that stayed under INERT_SHARE of CE both by its
    weighted value and by its gradient (a term on the projection head, which CE never reaches, may be small in value
    and still pull): it trained nearly nothing, a bug where the recipe means it to act. D-Geo, whose ramp starts
    later, is not judged here; history.jsonl and curves.png show what it does."""
    if epoch["epoch"] != 1:
        return
    for term, weight in weights.items():
        if term == "ce" or weight == 0:
            continue
        value_share = epoch["weighted"][term] / epoch["weighted"]["ce"]
        gradient_share = epoch["gradient_share"].get(term, 0.0)
        if max(value_share, gradient_share) < INERT_SHARE:
            print(f"warning: {term} barely acts: in epoch 1, at weight {weight:g}, it was {100 * value_share:.2f}% of "
                  f"CE by value and {100 * gradient_share:.2f}% by gradient (under {100 * INERT_SHARE:g}% both); "
                  "raise its weight, or see history.jsonl", file=sys.stderr)


def setup_distributed(device):
    """(device, rank, world) of this process: under torchrun, a process group (NCCL on GPUs, gloo on the CPU) and
    each process's own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def training_data(args, rank, world):
    """(FERPlus splits, their identity, 'real' or 'synthetic'), after checking that training and validation each have
    an image to use: an empty split would otherwise show only after an epoch of training."""
    if args.ferplus:
        ferplus_dir, source = args.ferplus, "real"
    else:
        ferplus_dir, source = synthetic_ferplus(args.run_dir, args.synthetic_size, args.data_seed,
                                                write=rank == 0), "synthetic"
        if world > 1:
            dist.barrier()
    splits, data_key = load_ferplus_cached(ferplus_dir, os.path.join(args.run_dir, "cache"), args.training_labels)
    for split, what in (("train", "training"), ("valid", "validation")):
        if not len(splits[split].labels):
            raise FerPlusError(f"{ferplus_dir}: no {what} image is left after the label rule (every {split} image was "
                               "dropped or unreadable); nothing to train on")
    if len(splits["train"].labels) < args.batch_size:
        raise FerPlusError(f"{ferplus_dir}: {len(splits['train'].labels)} training images make no batch of "
                           f"--batch-size {args.batch_size}")
    return splits, data_key, source


def build_loss(args, train_labels, device):
    """The student's loss (StudentLoss): CE's class weights from the training set's class counts (--class-weights),
    and Proto-KD + D-Geo from stage 2's bank, checked against its manifest; with the bank's hash, side and size."""
    proto_dgeo = ProtoDGeoLoss.from_bank(os.path.join(args.run_dir, "stage2", "prototypes.npz"), args.tau,
                                         args.var_cap, args.margin)
    weights = class_weights(np.bincount(train_labels, minlength=len(FER_CLASSES)), args.class_weights)
    loss = StudentLoss(proto_dgeo, weights, args.kd_weight, args.proto_weight, args.dgeo_weight, args.kd_loss,
                       args.kd_temperature, LABEL_SMOOTHING, (args.ramp_start, args.ramp_end)).to(device)
    return loss, {"prototypes_sha256": proto_dgeo.bank_sha256, "grid": proto_dgeo.grid,
                  "embedding_size": int(proto_dgeo.embedding_dim),
                  "anchors": [DEFAULT_ANCHORS[name] for name in FER_CLASSES]}


def build_student(args, embedding_size, device, world):
    """(the student, the module that trains it: itself, or its DDP wrapper under torchrun)."""
    torch.manual_seed(args.seed)
    model = Student(args.arch, len(FER_CLASSES), embedding_size, args.input_size)
    if args.pretrained:
        load_backbone_weights(model, args.pretrained)
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    trained = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=args.proto_weight == 0 and args.dgeo_weight == 0)
    return model, torch.compile(trained) if args.compile else trained  # model keeps the state_dict's plain names


@dataclass
class Training:
    """What a step changes and a resume checkpoint holds: the optimiser's parts and where the run stands."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    history: list = field(default_factory=list)
    epoch: int = 0       # epochs finished
    step: int = 0        # steps finished of the epoch under way
    best_f1: float = -1.0
    sums: dict = field(default_factory=lambda: dict.fromkeys(TERMS, 0.0))  # the epoch's loss sums so far
    shares: dict = field(default_factory=dict)  # the epoch's gradient shares, once measured

    def save(self, path, config):
        artifacts.save_checkpoint({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
            "step": self.step, "history": self.history, "best_f1": self.best_f1, "sums": self.sums,
            "shares": self.shares, "config": config}, path)

    def restore(self, checkpoint):
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):  # none or empty where the checkpoint's run had no float16 scaler
            self.scaler.load_state_dict(checkpoint["scaler"])
        for key in ("history", "epoch", "step", "best_f1", "sums", "shares"):
            setattr(self, key, checkpoint[key])


def autocast_settings(precision, device):
    """torch.autocast's arguments for mixed_precision's choice (None: float32, autocast off)."""
    return dict(device_type=device.type, dtype=precision or torch.bfloat16, enabled=precision is not None)


def optimisation(args, model, device, steps_per_epoch):
    """The Training of a fresh run: AdamW, the warmup-then-cosine schedule, and the float16 gradient scaler."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup_steps, total_steps))
    return Training(model, optimizer, scheduler, gradient_scaler(device, mixed_precision(args.amp, device)))


class Batches(NamedTuple):
    """The training set on the device (FERPlus: at most 66 MB of uint8), so a step copies no images to it; and what
    each step needs to cut and augment its share of a global batch."""
    images: torch.Tensor
    labels: torch.Tensor
    soft_targets: torch.Tensor  # class distributions with --training-labels probability, else None
    rank: int
    world: int

    def network_input(self, batch, seed, size):
        """This process's share of the batch, augmented by the draws of `seed`, at size x size: the same seed gives the
        same crops, flips, turns and erasures at any size, so a KD teacher trained at another size sees the very
        images the student sees, at its own size."""
        x = augment(self.images[batch], torch.Generator().manual_seed(seed), size,
                    part=slice(self.rank, None, self.world))
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


def training_step(state, trained, teacher, batches, batch, seed, args, loss_fn, autocast):
    """One optimiser step on a global batch; returns the loss terms' values (the step's one host synchronisation)."""
    x = batches.network_input(batch, seed, args.input_size)
    x_teacher = None
    if teacher is not None:
        x_teacher = x if teacher[1] == args.input_size else batches.network_input(batch, seed, teacher[1])
    with torch.autocast(**autocast):
        logits, z = trained(x)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher[0](x_teacher)[0]
    if batches.world > 1:  # every process takes the loss over the global batch, as one process would
        logits, z = gather_rows(logits), gather_rows(z)
        teacher_logits = None if teacher_logits is None else gather_rows(teacher_logits)
        batch = gathered_order(batch, batches.world)
    y = batches.labels[batch]
    ce_target = batches.soft_targets[batch] if batches.soft_targets is not None else None
    values = loss_fn(logits, z, y, teacher_logits, state.epoch, ce_target)
    if not state.shares:  # once an epoch, on its first step: how hard each term pulls against CE
        state.shares = gradient_shares(values, loss_fn.weights(state.epoch), [logits, z])
    logged = dict(zip(TERMS, torch.stack([values[term].detach() for term in TERMS]).tolist()))
    if not math.isfinite(logged["total"]):
        raise FloatingPointError(f"epoch {state.epoch + 1}, step {state.step}: the loss is not finite; stopping "
                                 "before training on it")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(values["total"]).backward()  # with no float16 scaler, the scaler's calls pass straight through
    state.scaler.unscale_(state.optimizer)
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    return logged


def train_one_epoch(state, trained, teacher, batches, args, loss_fn, autocast, checkpoint):
    """The rest of epoch state.epoch from step state.step, with a resume checkpoint every --checkpoint-every steps (to
    checkpoint = (path, config); none for None); returns the epoch's mean loss terms and images/s."""
    trained.train()
    steps_per_epoch = len(batches.labels) // args.batch_size
    order = torch.randperm(len(batches.labels), generator=torch.Generator().manual_seed(args.seed * 1000 + state.epoch))
    first, started = state.step, time.perf_counter()
    progress = tqdm(range(first, steps_per_epoch), disable=batches.rank != 0, unit="step", leave=False,
                    desc=f"epoch {state.epoch + 1}/{args.epochs}")
    for step in progress:
        state.step = step
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        seed = args.seed * 1_000_003 + state.epoch * 10_007 + step
        for term, value in training_step(state, trained, teacher, batches, batch, seed, args, loss_fn,
                                         autocast).items():
            state.sums[term] += value
        state.step = step + 1
        progress.set_postfix(loss=f"{state.sums['total'] / (state.step - first):.4f}")
        if state.step % args.checkpoint_every == 0 and state.step < steps_per_epoch:
            if checkpoint:
                state.save(*checkpoint)
    elapsed = time.perf_counter() - started
    means = {term: total / steps_per_epoch for term, total in state.sums.items()}
    return means, (steps_per_epoch - first) * args.batch_size / elapsed


def evaluate(model, valid, args, device):
    """Accuracy, macro-F1 and balanced accuracy on FERPlus valid."""
    scores = eight_way(predict(model, valid.images, args.input_size, device)[0], valid.labels)
    return {key: scores[key] for key in ("accuracy", "macro_f1", "balanced_accuracy")}


def write_student(out_dir, work_dir, args, config, inputs):
    """Put the finished run's files in place of stage3/<name>/, whole: the previous student stays until then."""
    with artifacts.atomic_dir(out_dir) as staging:
        for name in ("best.pt", "last.pt", "history.jsonl", "curves.png"):
            shutil.copy2(os.path.join(work_dir, name), os.path.join(staging, name))
        artifacts.write_config(staging, args, inputs)
        artifacts.write_manifest(staging)
    artifacts.remove_tree(work_dir, out_dir)


def log_to_tensorboard(folder, entry):
    """One epoch's loss terms (raw and weighted), gradient shares, valid scores and learning rate as scalars."""
    from torch.utils.tensorboard import SummaryWriter  # here: the tensorboard package is optional

    with SummaryWriter(folder) as writer:
        for group in ("train", "weighted", "gradient_share", "valid"):
            for key, value in entry[group].items():
                writer.add_scalar(f"{group}/{key}", value, entry["epoch"])
        writer.add_scalar("lr", entry["lr"], entry["epoch"])


def write_progress(work_dir, history, note):
    """history.jsonl and curves.png as they stand after an epoch, for whoever watches the run."""
    with artifacts.atomic_path(os.path.join(work_dir, "history.jsonl")) as temporary:
        with open(temporary, "w") as handle:
            handle.writelines(json.dumps(entry) + "\n" for entry in history)
    plot_curves(history, os.path.join(work_dir, "curves.png"), note)


def end_of_epoch(state, model, valid, args, device, work_dir, config, means, images_per_s, loss_fn, note):
    """Score the epoch on FERPlus valid, log it, and keep the student as best.pt where it is the best so far (and as
    last.pt after the last epoch)."""
    scores = evaluate(model, valid, args, device)
    weights = loss_fn.weights(state.epoch)
    state.history.append({"epoch": state.epoch + 1, "lr": state.scheduler.get_last_lr()[0],
                          "dgeo_ramp": dgeo_ramp(state.epoch, *loss_fn.ramp),
                          "train": means, "weighted": {term: weight * means[term] for term, weight in weights.items()},
                          "gradient_share": state.shares, "valid": scores, "images_per_s": images_per_s,
                          **({"loss_scale": state.scaler.get_scale()} if state.scaler.is_enabled() else {})})
    warn_of_inert_terms(state.history[-1], weights)
    print(f"epoch {state.epoch + 1}: loss {means['total']:.4f}, valid macro-F1 {scores['macro_f1']:.3f}, acc "
          f"{scores['accuracy']:.3f}, {images_per_s:.0f} images/s")
    kept = {"state_dict": model.state_dict(), "config": config, "epoch": state.epoch + 1, "valid": scores}
    if scores["macro_f1"] > state.best_f1:
        state.best_f1 = scores["macro_f1"]
        artifacts.save_checkpoint(kept, os.path.join(work_dir, "best.pt"))
    if state.epoch + 1 == args.epochs:
        artifacts.save_checkpoint(kept, os.path.join(work_dir, "last.pt"))
    write_progress(work_dir, state.history, note)
    if args.tensorboard:
        log_to_tensorboard(os.path.join(args.run_dir, "tensorboard", args.name), state.history[-1])


def train(args, device, rank, world):
    check_batch_share(args.batch_size, world)
    stage_dir = os.path.join(args.run_dir, "stage3")
    out_dir = os.path.join(stage_dir, args.name)
    work_dir = f"{out_dir}.partial"  # the run until it ends: its checkpoint, best.pt and the curves so far
    checkpoint_path = os.path.join(work_dir, "checkpoint.pt")
    splits, data_key, source = training_data(args, rank, world)
    note = " (synthetic data: not the paper's numbers)" if source == "synthetic" else ""
    train_set, valid = splits["train"], splits["valid"]
    loss_fn, bank_facts = build_loss(args, train_set.labels, device)
    teacher, teacher_size, teacher_hash = load_teacher(args.kd_teacher, device) if args.kd_teacher else (None,) * 3
    model, trained = build_student(args, bank_facts["embedding_size"], device, world)
    steps_per_epoch = len(train_set.labels) // args.batch_size
    state = optimisation(args, model, device, steps_per_epoch)
    precision = mixed_precision(args.amp, device)
    autocast = autocast_settings(precision, device)
    config = {key: value for key, value in vars(args).items() if key not in ("device", "resume", "run_dir")}
    config.update(bank_facts, positive=list(DEFAULT_POSITIVE), kd_teacher_sha256=teacher_hash, data_key=data_key,
                  source=source, world_size=world, precision=str(precision or torch.float32),
                  class_weighting=args.class_weights, class_weights=loss_fn.class_weights.tolist(),
                  label_smoothing=LABEL_SMOOTHING,
                  pretrained_sha256=artifacts.sha256_file(args.pretrained) if args.pretrained else None)

    # Another process count continues the same run: every process takes its share of the same global batches, and
    # the loss is taken over the whole of each (only BatchNorm's per-process statistics differ).
    checkpoint = artifacts.resume_checkpoint(checkpoint_path, config, args.resume, may_change=EXECUTION_SETTINGS)
    if checkpoint is not None:
        state.restore(checkpoint)
        before = checkpoint["config"]["world_size"]
        if rank == 0:
            print(f"resuming at epoch {state.epoch + 1}, step {state.step}"
                  + (f", in {world} processes where the checkpoint's run had {before}" if before != world else ""))
    elif rank == 0:
        if args.resume:
            print(f"--resume: no checkpoint at {checkpoint_path} (none was left, or the run finished); starting "
                  "afresh")
        if os.path.lexists(work_dir):
            artifacts.remove_tree(work_dir, out_dir)  # an unfinished earlier run's; stage3/<name>/ stays as it was
        os.makedirs(work_dir)
    if rank == 0:
        artifacts.write_json(os.path.join(stage_dir, "data_summary.json"), {**data_summary(splits), "source": source})
    checkpoint = (checkpoint_path, config) if rank == 0 else None  # where rank 0 saves it; the others do not
    batches = Batches(torch.from_numpy(train_set.images).to(device), torch.from_numpy(train_set.labels).to(device),
                      torch.from_numpy(train_set.targets).to(device) if args.training_labels == "probability" else None,
                      rank, world)
    if teacher is not None and args.compile:
        teacher = torch.compile(teacher)
    kd_teacher = (teacher, teacher_size) if teacher is not None and args.kd_weight > 0 else None
    while state.epoch < args.epochs:
        means, images_per_s = train_one_epoch(state, trained, kd_teacher, batches, args, loss_fn, autocast,
                                              checkpoint)
        if rank == 0:
            end_of_epoch(state, model, valid, args, device, work_dir, config, means, images_per_s, loss_fn, note)
        state.epoch, state.step, state.sums, state.shares = state.epoch + 1, 0, dict.fromkeys(TERMS, 0.0), {}
        if checkpoint:
            state.save(*checkpoint)
    if rank == 0:
        write_student(out_dir, work_dir, args, config, {"stage2/prototypes.npz": bank_facts["prototypes_sha256"],
                                                        "ferplus": data_key, "kd_teacher": teacher_hash})
        print(f"best valid macro-F1 {state.best_f1:.3f}{note}; wrote {out_dir}/")


def main(argv=None):
    args = parse_args(argv)
    set_determinism(args.deterministic)
    device, rank, world = setup_distributed(torch.device(args.device))
    # One writer per run name: a second run of it stops at once, naming the first (rank 0 writes for every process).
    with artifacts.folder_lock(os.path.join(args.run_dir, "stage3", args.name)) if rank == 0 else nullcontext():
        train(args, device, rank, world)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (FerPlusError, artifacts.ArtifactError, ValueError, FloatingPointError) as error:
        sys.exit(f"stage3_student.py: {error}")
