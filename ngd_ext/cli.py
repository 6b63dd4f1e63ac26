"""What the stages' command lines share: the types that check a flag's value as argparse reads it (so that a bad
value is a usage error naming the flag), the device check, and the two flags that shape the embedded synthetic
default, --synthetic-size and --data-seed."""

import argparse
import math
import re

import torch

from ngd_ext.emotions import FER_CLASSES
from ngd_ext.student_loss import CLASS_WEIGHTINGS

SIZE, DATA_SEED = "demo", 0
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")


def run_name(text):
    """A stage-3 run's name: one folder name of letters, digits, '_' and '-' (no path, no dot), at most 100 long."""
    if not RUN_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a run name: use 1 to 100 letters, digits, '_' and '-', starting with a letter or digit "
            "(it names a folder under stage3/, never a path)")
    return text


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
    return value


def non_negative(text):
    """A finite number >= 0 (a loss weight, a weight decay)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0")
    return value


def positive(text):
    """A finite number > 0 (a learning rate, a temperature)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return value


def class_weighting(text):
    """--class-weights: one of the named weightings, or one finite number >= 0 per FERPlus class, comma-separated."""
    if text in CLASS_WEIGHTINGS:
        return text
    numbers = [field.strip() for field in text.split(",")]
    if len(numbers) != len(FER_CLASSES):
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(CLASS_WEIGHTINGS)}, or "
                                         f"{len(FER_CLASSES)} comma-separated numbers ({', '.join(FER_CLASSES)}); got "
                                         f"{len(numbers)}")
    return [non_negative(number) for number in numbers]


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def device(text):
    """A torch device this machine has: cpu, cuda or cuda:N (N below the GPU count), mps where it is there."""
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that torch can use (torch "
                                             f"{torch.__version__}, built for CUDA {torch.version.cuda}); use cpu")
        if chosen.index is not None and chosen.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s), numbered from 0")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use cpu")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: the stages run on cpu, cuda or mps")
    return text


def add_synthetic_flags(parser, sizes, what):
    """Add --synthetic-size (one of `sizes`) and --data-seed; `what` names the data they shape in the help."""
    parser.add_argument("--synthetic-size", choices=sorted(sizes),
                        help=f"size of {what}, used with no dataset flag (default {SIZE})")
    parser.add_argument("--data-seed", type=int,
                        help=f"seed of {what}, used with no dataset flag (default {DATA_SEED}); --seed leaves them as "
                             "they are")


def settle_synthetic_flags(parser, args, dataset_flags):
    """Fill in --synthetic-size and --data-seed after parsing, or stop with a usage error naming them where a flag of
    `dataset_flags` (e.g. ["--ferplus"]) was given beside them."""
    given = [flag for flag, value in (("--synthetic-size", args.synthetic_size), ("--data-seed", args.data_seed))
             if value is not None]
    datasets = [flag for flag in dataset_flags if getattr(args, flag[2:].replace("-", "_"))]
    if given and datasets:
        verb, pronoun = ("shapes", "it") if len(given) == 1 else ("shape", "them")
        parser.error(f"{' and '.join(given)} {verb} the embedded synthetic default, which {' and '.join(datasets)} "
                     f"{'replaces' if len(datasets) == 1 else 'replace'}: leave {pronoun} out")
    args.synthetic_size = SIZE if args.synthetic_size is None else args.synthetic_size
    args.data_seed = DATA_SEED if args.data_seed is None else args.data_seed
