"""Stage 3: the FERPlus student, trained with CE + logit KD + Proto-KD + D-Geo (SPEC section 4).

Reads FERPlus (--ferplus DIR: fer2013.csv + fer2013new.csv, or the FER2013{Train,Valid,Test} folders) or, with
no --ferplus, the embedded synthetic default; and stage 2's prototype bank, after checking it against stage 2's
manifest. Writes RUN_DIR/stage3/data_summary.json and RUN_DIR/stage3/<name>/:

  best.pt         state_dict + config of the epoch with the best FERPlus-valid macro-F1
  history.jsonl   one line per epoch: every loss term, valid accuracy, macro-F1, bACC, learning rate, images/s
                  (and with --amp fp16 the gradient scaler's loss scale)
  curves.png      losses and valid scores per epoch
  config.json, SHA256SUMS

Presets: B0 = CE; B1 = CE + KD; B2 = B1 + Proto-KD; B3 = B2 + D-Geo (the full model); every weight can be
overridden. KD needs a visual teacher: a best.pt of another stage-3 run. The two-step recipe:

    python stage3_student.py --variant B0 --name kd_teacher
    python stage3_student.py --variant B3 --kd-teacher runs/demo/stage3/kd_teacher/best.pt

On the embedded default, epochs and the D-Geo ramp default to a short schedule (see --help); with real data to
the paper's. More processes: torchrun --nproc_per_node=N stage3_student.py ... (DDP; NCCL on GPUs, gloo on
CPU): each process runs the network on its share of the global batch, and every loss term is taken over the
whole global batch, as one process takes it; on GPUs, --sync-bn takes BatchNorm's statistics over it too. A run
killed at any moment continues with --resume from its last checkpoint. On GPUs, --deterministic makes a run repeat
bit for bit (on CPU it does anyway).
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from typing import NamedTuple

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import ngd_ext  # noqa: E402
from ngd_ext import artifacts  # noqa: E402
from ngd_ext.determinism import set_determinism  # noqa: E402
from ngd_ext.distributed import gather_rows  # noqa: E402
from ngd_ext.emotions import DEFAULT_ANCHORS, DEFAULT_POSITIVE, FER_CLASSES  # noqa: E402
from ngd_ext.ferplus import FerPlusError, data_summary, load_ferplus_cached  # noqa: E402
from ngd_ext.metrics import eight_way  # noqa: E402
from ngd_ext.prototypes import proto_kd_targets  # noqa: E402
from ngd_ext.student_model import (ARCHITECTURES, EXECUTION_SETTINGS, Student, load_backbone_weights,  # noqa: E402
                                   load_student, predict)
from ngd_ext.synthetic_default import add_synthetic_flags, settle_synthetic_flags  # noqa: E402
from ngd_ext.synthetic_faces import FERPLUS_SIZES, synthetic_ferplus  # noqa: E402

# Defaults ---------------------------------------------------------------------------------------------------
RUN_DIR = "runs/demo"
PRESETS = {  # weights of KD, Proto-KD and D-Geo
    "B0": (0.0, 0.0, 0.0), "B1": (0.30, 0.0, 0.0), "B2": (0.30, 0.12, 0.0), "B3": (0.30, 0.12, 0.012)}
SCHEDULES = {  # epochs, D-Geo ramp start and end (epochs)
    "paper": dict(epochs=80, ramp_start=20, ramp_end=60),
    "synthetic": dict(epochs=6, ramp_start=1, ramp_end=4),
}
LABEL_SMOOTHING = 0.055
KD_TEMPERATURE = 5.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=RUN_DIR, help=f"run folder holding stage2/ (default {RUN_DIR})")
    parser.add_argument("--ferplus", help="FERPlus folder (default: the embedded synthetic faces)")
    add_synthetic_flags(parser, FERPLUS_SIZES, "the embedded synthetic faces")
    parser.add_argument("--variant", choices=sorted(PRESETS), default="B3", help="loss preset (default B3)")
    parser.add_argument("--name", help="output folder under stage3/ (default: the variant)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="resnet18",
                        help="torchvision backbone (default resnet18)")
    parser.add_argument("--input-size", type=int, default=48, help="image side fed to the network (default 48)")
    parser.add_argument("--pretrained", help="local state_dict file for the backbone (never downloaded)")
    parser.add_argument("--kd-teacher", help="best.pt of another stage-3 run, the logit-KD teacher")
    parser.add_argument("--kd-loss", choices=("mse", "kl"),
                        help="logit KD at T = 5: squared distance of the softened softmaxes (mse, the default), or "
                             "T^2 KL (kl)")
    parser.add_argument("--kd-weight", type=float, help="override the preset's KD weight")
    parser.add_argument("--proto-weight", type=float, help="override the preset's Proto-KD weight")
    parser.add_argument("--dgeo-weight", type=float, help="override the preset's D-Geo weight")
    parser.add_argument("--tau", type=float, default=0.9, help="Proto-KD temperature (default 0.9)")
    parser.add_argument("--var-cap", type=float, default=0.2, help="D-Geo variance cap (default 0.2)")
    parser.add_argument("--margin", type=float, default=0.5, help="D-Geo inter-class margin (default 0.5)")
    parser.add_argument("--training-labels", choices=("majority", "probability"), default="majority",
                        help="FERPlus training targets: the official majority rule's class (default), or the votes' "
                             "distribution (probability rule); valid and test always use the majority rule")
    parser.add_argument("--epochs", type=int, help="epochs (default 80 on FERPlus, 6 on the synthetic default)")
    parser.add_argument("--ramp-start", type=int, help="first epoch of the D-Geo ramp (default 20; synthetic 1)")
    parser.add_argument("--ramp-end", type=int,
                        help="epoch at which the D-Geo ramp reaches 1 (default 60; synthetic 4)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup before the cosine (default 1)")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="steps between resume checkpoints (default 50; one also ends each epoch)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default cuda when available); under torchrun, each process's GPU")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="mixed precision: auto (default) is bf16 on GPUs of compute capability 8.0 on (A100, "
                             "H100, RTX 30xx on), fp16 with a gradient scaler on older ones (V100, T4), and off, "
                             "float32 throughout, on the CPU")
    parser.add_argument("--sync-bn", action="store_true",
                        help="BatchNorm statistics over the global batch under torchrun (GPUs only), as one process")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU algorithms only, so that a run repeats bit for bit (default: cuDNN's "
                             "fastest; CPU runs repeat either way)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model, the batch order and the augmentation (default 0); students of "
                             "several seeds train on the same faces")
    args = parser.parse_args(argv)
    settle_synthetic_flags(parser, args, ["--ferplus"])
    schedule = SCHEDULES["synthetic" if args.ferplus is None else "paper"]
    for key, value in schedule.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    weights = dict(zip(("kd_weight", "proto_weight", "dgeo_weight"), PRESETS[args.variant]))
    for key, value in weights.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or args.variant
    if args.kd_weight > 0 and not args.kd_teacher:
        parser.error(f"--variant {args.variant} uses logit KD (weight {args.kd_weight}): give --kd-teacher (a "
                     "stage-3 best.pt, e.g. of a B0 run) or --kd-weight 0")
    for flag, value, what in (("--kd-teacher", args.kd_teacher, "teacher"), ("--kd-loss", args.kd_loss, "KD loss")):
        if value and args.kd_weight == 0:
            parser.error(f"{flag} {value}: the logit-KD weight is 0 (--variant {args.variant}"
                         f"{', --kd-weight 0' if args.variant != 'B0' else ''}), so the {what} would go unused; leave "
                         "it out, or give a positive --kd-weight")
    args.kd_loss = args.kd_loss or "mse"
    if args.sync_bn and not args.device.startswith("cuda"):
        parser.error(f"--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on {args.device!r})")
    if args.epochs < 1 or args.batch_size < 2 or args.checkpoint_every < 1 or args.input_size < 16:
        parser.error("--epochs and --checkpoint-every must be at least 1, --batch-size at least 2 (BatchNorm needs two "
                     "images per step), --input-size at least 16")
    if not args.tau > 0 or args.var_cap < 0 or args.margin < 0 or args.warmup_epochs < 0:
        parser.error(f"--tau must be positive (got {args.tau:g}); --var-cap, --margin and --warmup-epochs must not be "
                     f"negative (got {args.var_cap:g}, {args.margin:g} and {args.warmup_epochs:g})")
    return args


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


def dgeo_ramp(epoch, start, end):
    """w(e) of SPEC section 4 (epochs counted from 0)."""
    if epoch < start:
        return 0.0
    if epoch >= end:
        return 1.0
    return (1 - math.cos(math.pi * (epoch - start) / (end - start))) / 2


def learning_rate_factor(step, warmup_steps, total_steps):
    """The learning rate's multiplier at a step: a linear warmup, then a cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(total_steps - warmup_steps, 1)))


def kd_loss(student_logits, teacher_logits, kind, temperature=KD_TEMPERATURE):
    student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    if kind == "mse":
        return ((student.exp() - teacher.exp()) ** 2).sum(dim=1).mean()
    return temperature ** 2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def augment(images, generator, size, part=slice(None)):
    """A batch of uint8 N x 48 x 48 images -> images[part] as float M x 1 x size x size, on the images' device: random
    crop (pad 4), flip, a small affine (rotation, scale), random erasing. All randomness comes from `generator` and
    is drawn for the whole batch, so a resumed run repeats it, and a DDP process (part = its share) gets the images
    one process would. Tensor operations over the whole batch, with no loop over the images: on a GPU the work stays
    on the GPU."""
    n = len(images)
    draws = (torch.randint(0, 9, (n, 2), generator=generator),  # crop offsets
             torch.rand(n, generator=generator) < 0.5,  # flip
             (torch.rand(n, generator=generator) - 0.5) * math.radians(20),  # angle
             1 + (torch.rand(n, generator=generator) - 0.5) * 0.2,  # scale
             torch.rand(n, generator=generator) < 0.25,  # erase
             (torch.rand(n, 2, generator=generator) * size * 0.75).long())  # erased square's corner
    offsets, flip, angle, scale, erase, corners = (draw[part].to(images.device) for draw in draws)
    padded = F.pad(images[part].float().div(255).unsqueeze(1), (4, 4, 4, 4), mode="replicate")[:, 0]
    rows, cols = (offsets[:, axis, None] + torch.arange(48, device=images.device) for axis in (0, 1))
    x = padded[torch.arange(len(padded), device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    x = torch.where(flip[:, None, None], x.flip(-1), x).unsqueeze(1)
    theta = torch.zeros(len(x), 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    x = F.grid_sample(x, F.affine_grid(theta, (len(x), 1, size, size), align_corners=False), padding_mode="border",
                      align_corners=False)
    pixels = torch.arange(size, device=images.device)
    in_rows, in_cols = ((pixels >= corners[:, axis, None]) & (pixels < corners[:, axis, None] + size // 4)
                        for axis in (0, 1))
    square = erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
    x = torch.where(square[:, None], 0.5, x)
    return (x - 0.5) / 0.25


class LossConstants(NamedTuple):
    """What the student loss takes besides the batch: CE's class weights and the Proto-KD + D-Geo op's constants."""
    class_weights: torch.Tensor
    protos: torch.Tensor
    target_table: torch.Tensor
    positive: torch.Tensor


def loss_terms(logits, z, labels, ce_target, teacher_logits, ramp, args, constants):
    """SPEC section 4's student loss over a batch, term by term; `total` is the one to minimise. teacher_logits is
    None without KD; ce_target is the labels, or class distributions with --training-labels probability."""
    ce = F.cross_entropy(logits.float(), ce_target, weight=constants.class_weights, label_smoothing=LABEL_SMOOTHING)
    kd = ce.new_zeros(()) if teacher_logits is None else kd_loss(logits.float(), teacher_logits.float(), args.kd_loss)
    proto_kd, var_cap, margin = ngd_ext.proto_dgeo_loss(z.float(), constants.protos, constants.target_table, labels,
                                                        constants.positive, args.tau, args.var_cap, args.margin)
    total = (ce + args.kd_weight * kd + args.proto_weight * proto_kd
             + args.dgeo_weight * ramp * (var_cap + margin))
    return {"total": total, "ce": ce, "kd": kd, "proto_kd": proto_kd, "var_cap": var_cap, "margin": margin}


def check_batch_share(batch_size, world):
    """Each of the world processes takes an equal share of every global batch, of two images at least: BatchNorm,
    which normalises over each process's share, cannot train on one image."""
    if batch_size % world or batch_size // world < 2:
        raise ValueError(f"--batch-size {batch_size} must divide among the {world} processes, at least 2 images each "
                         f"(BatchNorm needs two per step in every process)")


def gathered_order(batch, world):
    """The batch's rows in the order gather_rows returns them, when each process takes batch[rank::world]."""
    return torch.cat([batch[rank::world] for rank in range(world)])


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


def plot_curves(history, path, note):
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    for term in ("total", "ce", "kd", "proto_kd", "var_cap", "margin"):
        left.plot(epochs, [h["train"][term] for h in history], label=term)
    left.set_yscale("symlog", linthresh=1e-3)
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    left.legend(fontsize=8)
    for score in ("accuracy", "macro_f1", "balanced_accuracy"):
        right.plot(epochs, [h["valid"][score] for h in history], label=score)
    right.set_xlabel("epoch")
    right.set_ylabel("FERPlus valid")
    right.legend(fontsize=8)
    figure.suptitle(f"student{note}", fontsize=10)
    artifacts.save_figure(figure, path)


def main(argv=None):
    args = parse_args(argv)
    set_determinism(args.deterministic)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    check_batch_share(args.batch_size, world)
    stage_dir = os.path.join(args.run_dir, "stage3")
    out_dir = os.path.join(stage_dir, args.name)
    checkpoint_path = os.path.join(stage_dir, f"{args.name}-checkpoint.pt")

    # Data -------------------------------------------------------------------------------------------------
    if args.ferplus:
        ferplus_dir, source = args.ferplus, "real"
    else:
        ferplus_dir = synthetic_ferplus(args.run_dir, args.synthetic_size, args.data_seed, write=rank == 0)
        source = "synthetic"
        if distributed:
            dist.barrier()
    note = " (synthetic data: not the paper's numbers)" if source == "synthetic" else ""
    splits, data_key = load_ferplus_cached(ferplus_dir, os.path.join(args.run_dir, "cache"), args.training_labels)
    train, valid = splits["train"], splits["valid"]
    counts = np.bincount(train.labels, minlength=len(FER_CLASSES)).astype(np.float64)
    class_weights = torch.tensor(np.where(counts > 0, 1 / np.maximum(counts, 1), 0), dtype=torch.float32)
    class_weights = (class_weights / class_weights[class_weights > 0].mean()).to(device)

    stage2_dir = os.path.join(args.run_dir, "stage2")
    bank_hash = artifacts.verify_manifest(stage2_dir, ["prototypes.npz"])["prototypes.npz"]
    with np.load(os.path.join(stage2_dir, "prototypes.npz")) as saved:
        bank, grid = saved["bank"].astype(np.float64), int(saved["G"])
    anchors = [DEFAULT_ANCHORS[name] for name in FER_CLASSES]
    constants = LossConstants(
        class_weights=class_weights,
        protos=torch.tensor(bank, dtype=torch.float32, device=device),
        target_table=torch.tensor(proto_kd_targets(bank, grid, anchors, args.tau), dtype=torch.float32, device=device),
        positive=torch.tensor([name in DEFAULT_POSITIVE for name in FER_CLASSES], device=device))
    teacher, teacher_size, teacher_hash = load_teacher(args.kd_teacher, device) if args.kd_teacher else (None,) * 3

    # Model, optimiser, schedule -----------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    model = Student(args.arch, len(FER_CLASSES), bank.shape[1])
    if args.pretrained:
        load_backbone_weights(model, args.pretrained)
    if args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    trained = model
    if distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.proto_weight == 0 and args.dgeo_weight == 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train.labels) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train.labels)} training images make no batch of --batch-size {args.batch_size}")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup_steps, total_steps))
    precision = mixed_precision(args.amp, device)
    autocast = dict(device_type=device.type, dtype=precision or torch.bfloat16, enabled=precision is not None)
    scaler = gradient_scaler(device, precision)

    config = {key: value for key, value in vars(args).items() if key not in ("device", "resume", "run_dir")}
    config.update(embedding_size=int(bank.shape[1]), grid=grid, anchors=anchors, positive=list(DEFAULT_POSITIVE),
                  prototypes_sha256=bank_hash, kd_teacher_sha256=teacher_hash, data_key=data_key, source=source,
                  world_size=world, precision=str(precision or torch.float32), class_weights=class_weights.tolist(),
                  label_smoothing=LABEL_SMOOTHING, kd_temperature=KD_TEMPERATURE)
    history, start_epoch, start_step, best_f1 = [], 0, 0, -1.0
    # Another process count continues the same run: every process takes its share of the same global batches, and
    # the loss is taken over the whole of each (only BatchNorm's per-process statistics differ).
    checkpoint = artifacts.resume_checkpoint(checkpoint_path, config, args.resume, may_change=EXECUTION_SETTINGS)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):  # none or empty where the checkpoint's run had no float16 scaler
            scaler.load_state_dict(checkpoint["scaler"])
        history, start_epoch, start_step, best_f1 = (checkpoint["history"], checkpoint["epoch"], checkpoint["step"],
                                                     checkpoint["best_f1"])
        if rank == 0:
            before = checkpoint["config"]["world_size"]
            print(f"resuming at epoch {start_epoch + 1}, step {start_step}"
                  + (f", in {world} processes where the checkpoint's run had {before}" if before != world else ""))
    elif rank == 0:
        if args.resume:
            print(f"--resume: no checkpoint at {checkpoint_path} (none was left, or the run finished); starting "
                  "afresh")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)  # a fresh run: never leave an older run's files looking current
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        artifacts.write_json(os.path.join(stage_dir, "data_summary.json"), {**data_summary(splits), "source": source})
        manifest = os.path.join(out_dir, artifacts.MANIFEST)
        if os.path.exists(manifest):
            os.remove(manifest)

    def save_checkpoint(epoch, step, sums):
        if rank != 0:
            return
        with artifacts.atomic_path(checkpoint_path) as temporary:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                        "step": step, "history": history, "best_f1": best_f1, "sums": sums, "config": config},
                       temporary)

    # Training ---------------------------------------------------------------------------------------------
    # The training set lives on the device (FERPlus: at most 66 MB of uint8), so a step copies no images to it.
    images = torch.from_numpy(train.images).to(device)
    labels = torch.from_numpy(train.labels).to(device)
    soft_targets = torch.from_numpy(train.targets).to(device) if args.training_labels == "probability" else None
    terms = ("total", "ce", "kd", "proto_kd", "var_cap", "margin")

    def network_input(batch, seed, size):
        """This process's share of the batch, augmented by the draws of `seed`, at size x size: the same seed gives the
        same crops, flips, turns and erasures at any size, so a KD teacher trained at another size sees the very
        images the student sees, at its own size."""
        x = augment(images[batch], torch.Generator().manual_seed(seed), size, part=slice(rank, None, world))
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

    for epoch in range(start_epoch, args.epochs):
        trained.train()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        ramp = dgeo_ramp(epoch, args.ramp_start, args.ramp_end)
        sums = checkpoint["sums"] if epoch == start_epoch and start_step else dict.fromkeys(terms, 0.0)
        started = time.perf_counter()
        progress = tqdm(range(start_step if epoch == start_epoch else 0, steps_per_epoch), disable=rank != 0,
                        desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", leave=False)
        for step in progress:
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            step_seed = args.seed * 1_000_003 + epoch * 10_007 + step
            x = network_input(batch, step_seed, args.input_size)
            x_teacher = None
            if teacher is not None and args.kd_weight > 0:
                x_teacher = x if teacher_size == args.input_size else network_input(batch, step_seed, teacher_size)
            with torch.autocast(**autocast):
                logits, z = trained(x)
                teacher_logits = None
                if x_teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(x_teacher)[0]
            if distributed:  # every process takes the loss over the global batch, as one process would
                logits, z = gather_rows(logits), gather_rows(z)
                teacher_logits = None if teacher_logits is None else gather_rows(teacher_logits)
                batch = gathered_order(batch, world)
            y = labels[batch]
            ce_target = soft_targets[batch] if soft_targets is not None else y
            values = loss_terms(logits, z, y, ce_target, teacher_logits, ramp, args, constants)
            logged = torch.stack([values[term].detach() for term in terms]).tolist()  # the step's one host sync
            if not math.isfinite(logged[0]):
                raise FloatingPointError(f"epoch {epoch + 1}, step {step}: the loss is not finite; stopping before "
                                         "training on it")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(values["total"]).backward()  # with no float16 scaler, the scaler's calls pass through
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for term, value in zip(terms, logged):
                sums[term] += value
            if (step + 1) % args.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                save_checkpoint(epoch, step + 1, sums)
        elapsed = time.perf_counter() - started
        done = steps_per_epoch - (start_step if epoch == start_epoch else 0)
        if rank == 0:
            scores = eight_way(predict(model, valid.images, args.input_size, device)[0], valid.labels)
            history.append({"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "dgeo_ramp": ramp,
                            "train": {term: sums[term] / steps_per_epoch for term in terms},
                            "valid": {key: scores[key] for key in ("accuracy", "macro_f1", "balanced_accuracy")},
                            "images_per_s": done * args.batch_size / elapsed,
                            **({"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {})})
            print(f"epoch {epoch + 1}: loss {history[-1]['train']['total']:.4f}, valid macro-F1 "
                  f"{scores['macro_f1']:.3f}, acc {scores['accuracy']:.3f}, {history[-1]['images_per_s']:.0f} images/s")
            if scores["macro_f1"] > best_f1:
                best_f1 = scores["macro_f1"]
                with artifacts.atomic_path(os.path.join(out_dir, "best.pt")) as temporary:
                    torch.save({"state_dict": model.state_dict(), "config": config, "epoch": epoch + 1,
                                "valid": history[-1]["valid"]}, temporary)
        start_step = 0
        save_checkpoint(epoch + 1, 0, dict.fromkeys(terms, 0.0))

    # Outputs ----------------------------------------------------------------------------------------------
    if rank == 0:
        with artifacts.atomic_path(os.path.join(out_dir, "history.jsonl")) as temporary:
            with open(temporary, "w") as handle:
                handle.writelines(json.dumps(entry) + "\n" for entry in history)
        plot_curves(history, os.path.join(out_dir, "curves.png"), note)
        artifacts.write_config(out_dir, args, {"stage2/prototypes.npz": bank_hash, "ferplus": data_key,
                                               "kd_teacher": teacher_hash})
        artifacts.write_manifest(out_dir)
        os.remove(checkpoint_path)
        print(f"best valid macro-F1 {best_f1:.3f}{note}; wrote {out_dir}/")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (FerPlusError, artifacts.ArtifactError, ValueError, FloatingPointError) as error:
        sys.exit(f"stage3_student.py: {error}")
