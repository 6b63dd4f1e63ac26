"""Stage 1: the EEG teacher, which regresses valence and arousal from topographic maps of EEG.

Reads DREAMER (--dreamer DREAMER.mat) and/or MAHNOB-HCI (--mahnob DIR); with neither, it generates and reads
the embedded synthetic default (DREAMER- and MAHNOB-structured files under RUN_DIR/data/). Trials are read and
turned into features one at a time, in --workers processes, so that the datasets' samples are never in memory
together; the features are cached under RUN_DIR/cache/eeg_features/, keyed by each recording's content, the
settings and the feature code, so a rerun or a resumed run does not filter the EEG again. Whole subjects are held
out, so no window of a held-out subject is ever trained on. Writes RUN_DIR/stage1/:

  teacher.pt           state_dict + config (+ the feature standardisation), torch.load(weights_only=True)
  embeddings.npz       L2-normalised embeddings of the held-out windows, with valence, arousal, subject, trial
  metrics.json         held-out RMSE, Pearson r and CCC for valence and arousal, beside a mean baseline, over all
                       held-out windows, per dataset and per held-out subject; the first two with 95% bootstrap
                       intervals over the held-out subjects
  training_curve.png   training loss and held-out CCC per epoch
  held_out.png         predicted against self-reported valence and arousal: each held-out window, and each trial's
                       mean over its windows
  config.json, SHA256SUMS

    python stage1_teacher.py                                   # synthetic default, into runs/demo
    python stage1_teacher.py --dreamer DREAMER.mat --mahnob /data/MAHNOB-HCI --run-dir runs/real

A killed run continues from its last finished epoch (RUN_DIR/stage1.partial/checkpoint.pt) with --resume; until a run
finishes, the previous RUN_DIR/stage1/ stays as it was.
"""

import argparse
import functools
import itertools
import os
import sys
from typing import NamedTuple

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ngd_ext import artifacts, cli  # noqa: E402
from ngd_ext.data.eeg import (NOISY_AMPLITUDE_RATIO, EEGFormatError, MahnobScan, MahnobSession,  # noqa: E402
                              iter_dreamer, scan_mahnob)
from ngd_ext.data.eeg_cache import trial_entropy_or_skip, trial_entropy_or_stop  # noqa: E402
from ngd_ext.data.eeg_features import BANDS, SFREQ, interpolation_matrix, topographic_maps  # noqa: E402
from ngd_ext.data.synthetic_eeg import ensure_synthetic_eeg  # noqa: E402
from ngd_ext.emotions import VA_DIMENSIONS  # noqa: E402
from ngd_ext.metrics import BOOTSTRAP_LEVEL, intervals, regression_bootstrap, regression_metrics  # noqa: E402
from ngd_ext.runtime import default_workers, map_in_processes, set_determinism  # noqa: E402
from ngd_ext.teacher_embeddings import save_embeddings  # noqa: E402

# Defaults ---------------------------------------------------------------------------------------------------
RUN_DIR = "runs/demo"
WINDOW_S, STEP_S = 2.0, 1.0
MAP_SIZE = 16          # topographic maps are MAP_SIZE x MAP_SIZE per band
EMBEDDING_SIZE = 128
EPOCHS = 30
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-2
HELD_OUT_FRACTION = 0.25
BOOTSTRAP_RESAMPLES = 1000
SYNTHETIC_SIZES = {  # subjects, clips/sessions per subject and seconds per clip of the embedded default
    "demo": dict(dreamer_subjects=12, dreamer_clips=8, dreamer_seconds=20,
                 mahnob_subjects=8, mahnob_sessions_per_subject=5, mahnob_seconds=20),
    "tiny": dict(dreamer_subjects=3, dreamer_clips=3, dreamer_seconds=6,
                 mahnob_subjects=2, mahnob_sessions_per_subject=2, mahnob_seconds=6),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=RUN_DIR, help=f"run folder (default {RUN_DIR})")
    parser.add_argument("--dreamer", help="path of DREAMER.mat")
    parser.add_argument("--mahnob", help="MAHNOB-HCI folder holding Sessions/")
    cli.add_synthetic_flags(parser, SYNTHETIC_SIZES, "the embedded synthetic EEG")
    parser.add_argument("--device", type=cli.device, default=cli.default_device(),
                        help="torch device (default cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the training (default 0)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU algorithms only, so that a run repeats bit for bit (default: cuDNN's "
                             "fastest; CPU runs repeat either way)")
    parser.add_argument("--held-out-fraction", type=float, default=HELD_OUT_FRACTION,
                        help=f"share of each dataset's subjects held out (at least one; default {HELD_OUT_FRACTION})")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES,
                        help=f"resamples of the held-out subjects behind the intervals of the held-out scores, "
                             f"seeded by --seed (default {BOOTSTRAP_RESAMPLES}, at least 100)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"windows per batch (default {BATCH_SIZE})")
    parser.add_argument("--lr", type=cli.positive, default=LEARNING_RATE,
                        help=f"AdamW learning rate (default {LEARNING_RATE})")
    parser.add_argument("--weight-decay", type=cli.non_negative, default=WEIGHT_DECAY,
                        help=f"AdamW weight decay (default {WEIGHT_DECAY})")
    parser.add_argument("--loss", choices=("ccc", "mse"), default="ccc",
                        help="1 - concordance correlation (default), or mean squared error")
    parser.add_argument("--embedding-size", type=int, default=EMBEDDING_SIZE,
                        help=f"teacher embedding size E (default {EMBEDDING_SIZE})")
    parser.add_argument("--window-s", type=cli.positive, default=WINDOW_S,
                        help=f"window length, s (default {WINDOW_S})")
    parser.add_argument("--step-s", type=cli.positive, default=STEP_S,
                        help=f"step between windows, s (default {STEP_S})")
    parser.add_argument("--map-size", type=int, default=MAP_SIZE, help=f"topographic map side (default {MAP_SIZE})")
    parser.add_argument("--noisy-channel-ratio", type=float, default=NOISY_AMPLITUDE_RATIO, metavar="R",
                        help="leave out of a trial each channel whose 4-45 Hz amplitude is more than R times the "
                             "median channel's in its stimulus or baseline, as a constant channel is "
                             f"(default {NOISY_AMPLITUDE_RATIO:g}; 0: none)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last finished epoch of a killed run with the same settings")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="count and leave out the trials whose recording cannot be used (a MAHNOB-HCI BDF that "
                             "is damaged, lacks channels or marks no trial; a session whose session.xml names no "
                             "subject; a trial shorter than one window, or with more than a quarter of its channels "
                             "constant or noisy), listing them in metrics.json, instead of stopping; DREAMER.mat is "
                             "read whole, and a fault in it stops the run either way")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes that read trials and take their features; 1: all in this process "
                             "(default: the CPUs this process may run on, at most 8)")
    args = parser.parse_args(argv)
    cli.settle_synthetic_flags(parser, args, ["--dreamer", "--mahnob"])
    if not 0 < args.held_out_fraction < 1:
        parser.error(f"--held-out-fraction must be in (0, 1), got {args.held_out_fraction}")
    for name in ("epochs", "batch_size", "embedding_size", "map_size", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (args.noisy_channel_ratio == 0 or 1 < args.noisy_channel_ratio < np.inf):
        parser.error(f"--noisy-channel-ratio must be a finite number above 1, or 0 to leave out no channel as noisy, "
                     f"got {args.noisy_channel_ratio:g}")
    if args.bootstrap < 100:
        parser.error(f"--bootstrap must be at least 100, got {args.bootstrap}")
    if round(args.window_s * SFREQ) < 2 or round(args.step_s * SFREQ) < 1:
        parser.error(f"--window-s must span at least 2 samples and --step-s 1 at the features' {SFREQ} Hz (got "
                     f"{args.window_s:g} s and {args.step_s:g} s)")
    return args


def split_subjects(subjects_by_dataset, fraction, seed):
    """Held-out subjects: a share of each dataset's subjects (at least one where a dataset has two or more)."""
    rng = np.random.default_rng(seed)
    held_out = set()
    for dataset in sorted(subjects_by_dataset):
        subjects = sorted(subjects_by_dataset[dataset])
        if len(subjects) < 2:
            continue
        count = min(len(subjects) - 1, max(1, int(round(fraction * len(subjects)))))
        held_out.update(rng.choice(subjects, size=count, replace=False).tolist())
    return held_out


def window_data(trials, matrices, map_size):
    """Topographic maps of every window of the trials, with each window's labels and provenance (subject, trial,
    dataset); matrices holds an interpolation matrix per channel set."""
    windows_per_trial = [len(t.entropy) for t in trials]

    def per_window(field, dtype=None):
        return np.repeat(np.array([getattr(t, field) for t in trials], dtype), windows_per_trial)

    maps = np.concatenate([topographic_maps(t.entropy, matrices[t.ch_names], map_size) for t in trials])
    maps = maps.astype(np.float32)
    return (maps, per_window("valence", np.float32), per_window("arousal", np.float32), per_window("subject"),
            per_window("trial_id"), per_window("dataset"))


class Teacher(nn.Module):
    """A compact CNN on band topographic maps: an embedding of size E, and a valence/arousal head in [-1, 1]."""

    def __init__(self, bands, embedding_size):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(bands, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
            nn.Linear(128, embedding_size))
        self.head = nn.Linear(embedding_size, 2)

    def forward(self, maps):
        embedding = self.features(maps)
        return torch.tanh(self.head(embedding)), embedding


def ccc(prediction, target):
    """Lin's concordance correlation coefficient of each column."""
    mean_p, mean_t = prediction.mean(0), target.mean(0)
    covariance = ((prediction - mean_p) * (target - mean_t)).mean(0)
    return 2 * covariance / (prediction.var(0, unbiased=False) + target.var(0, unbiased=False)
                             + (mean_p - mean_t) ** 2 + 1e-8)


def held_out_scores(prediction, targets, subjects, resamples, seed):
    """regression_metrics of the windows, each dimension with the percentile-bootstrap intervals of its scores over
    the subjects: a subject's windows share its headset fit and its way of rating, so they are drawn whole. With one
    subject every resample would be the same, and the interval is None."""
    scores = regression_metrics(prediction, targets)
    samples = regression_bootstrap(prediction, targets, resamples, seed, subjects) if len(set(subjects)) > 1 else None
    for dimension in VA_DIMENSIONS:
        scores[dimension]["interval"] = intervals(samples[dimension]) if samples else None
    return scores


def with_interval(scores, name):
    """A score as text, with its interval where it has one: "0.879 [0.712, 0.934]"."""
    interval = scores["interval"]
    return f"{scores[name]:.3f}" + (f" [{interval[name][0]:.3f}, {interval[name][1]:.3f}]" if interval else "")


def predict(model, maps, device, batch_size):
    model.eval()
    outputs, embeddings = [], []
    with torch.no_grad():
        for start in range(0, len(maps), batch_size):
            output, embedding = model(torch.from_numpy(maps[start:start + batch_size]).to(device))
            outputs.append(output.cpu())
            embeddings.append(embedding.cpu())
    return torch.cat(outputs).numpy(), torch.cat(embeddings).numpy()


def plot_curve(history, path, note):
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    left.plot(epochs, [h["train_loss"] for h in history])
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    for name in VA_DIMENSIONS:
        right.plot(epochs, [h["held_out"][name]["ccc"] for h in history], label=name)
    right.axhline(0.0, color="grey", linestyle=":", label="mean baseline")
    right.set_xlabel("epoch")
    right.set_ylabel("held-out CCC")
    right.legend()
    figure.suptitle(f"EEG teacher{note}", fontsize=10)
    artifacts.save_figure(figure, path)


def plot_held_out(prediction, targets, datasets, trials, metrics, path, note):
    """Predicted against self-reported valence and arousal of the held-out windows. A trial's windows share its one
    self-report, so they stand in a column; the large dot is the trial's mean prediction."""
    trial_of = np.unique(trials, return_inverse=True)[1]
    windows_per_trial = np.bincount(trial_of)
    jitter = np.random.default_rng(0).uniform(-0.02, 0.02, len(trials))  # spreads a column's windows to be seen
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for column, (ax, name) in enumerate(zip(axes, VA_DIMENSIONS)):
        trial_mean = np.bincount(trial_of, weights=prediction[:, column]) / windows_per_trial
        trial_target = np.bincount(trial_of, weights=targets[:, column]) / windows_per_trial
        for d, dataset in enumerate(sorted(set(datasets))):
            windows = datasets == dataset
            of_dataset = np.unique(trial_of[windows])  # the dataset's trials, as indices of trial_mean
            ax.scatter(targets[windows, column] + jitter[windows], prediction[windows, column], s=4, alpha=0.25,
                       color=f"C{d}", linewidths=0)
            ax.scatter(trial_target[of_dataset], trial_mean[of_dataset], s=28, color=f"C{d}", edgecolors="black",
                       linewidths=0.5, label=f"{dataset}: {len(of_dataset)} trials, CCC "
                                             f"{metrics['by_dataset'][dataset]['held_out'][name]['ccc']:.2f}")
        ax.plot([-1, 1], [-1, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlim=(-1.1, 1.1), ylim=(-1.1, 1.1), xlabel=f"self-reported {name} (scaled to [-1, 1])",
               ylabel=f"predicted {name}")
        subjects = len(metrics["by_subject"])
        ax.set_title(f"{name}: CCC {with_interval(metrics['held_out'][name], 'ccc')} over {len(trials)} windows\n"
                     + (f"({BOOTSTRAP_LEVEL:.0%} interval over the {subjects} held-out subjects)" if subjects > 1
                        else "(one held-out subject: no interval)"), fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    figure.suptitle(f"EEG teacher on held-out subjects{note}", fontsize=10)
    artifacts.save_figure(figure, path)


class Inputs(NamedTuple):
    """What stage 1 reads: the trials' features, and what it left out and why, for metrics.json and config.json."""
    trials: list     # TrialEntropy
    skipped: list    # why each unusable trial was left out (--skip-unreadable)
    left_out: dict   # {"constant" / "noisy": {trial: [channels]}}
    source: str      # "real" or "synthetic"
    dreamer: str     # DREAMER.mat, or None
    mahnob: str      # the MAHNOB-HCI folder, or None


def load_trials(args):
    """Every trial's features, from the real files given or the embedded synthetic default, read in worker processes
    and cached; the unusable ones stop the run, or are left out with --skip-unreadable."""
    if args.dreamer or args.mahnob:
        dreamer_path, mahnob_root, source = args.dreamer, args.mahnob, "real"
    else:
        dreamer_path, mahnob_root = ensure_synthetic_eeg(os.path.join(args.run_dir, "data", "synthetic_eeg"),
                                                         args.data_seed, **SYNTHETIC_SIZES[args.synthetic_size])
        source = "synthetic"
    scan = scan_mahnob(mahnob_root) if mahnob_root else MahnobScan([], [], [])
    if scan.without_subject and not args.skip_unreadable:
        raise EEGFormatError(f"{scan.without_subject[0]} ({len(scan.without_subject)} such session(s) in all; "
                             "--skip-unreadable leaves them out, and lists them)")
    if mahnob_root:
        print(f"MAHNOB-HCI: {len(scan.sessions)} labelled sessions; skipped {len(scan.skipped_without_felt_labels)} "
              f"without felt labels and {len(scan.skipped_without_eeg)} without EEG")
    sources = itertools.chain(iter_dreamer(dreamer_path) if dreamer_path else (), scan.sessions)
    cache_dir = os.path.join(args.run_dir, "cache", "eeg_features")
    features = functools.partial(trial_entropy_or_skip if args.skip_unreadable else trial_entropy_or_stop,
                                 window_s=args.window_s, step_s=args.step_s, noisy_ratio=args.noisy_channel_ratio,
                                 cache_dir=cache_dir)
    trials = list(tqdm(map_in_processes(features, sources, args.workers), desc="features", unit="trial", leave=False))
    skipped = scan.without_subject + [trial for trial in trials if isinstance(trial, str)]
    trials = [trial for trial in trials if not isinstance(trial, str)]
    for reason in skipped:
        print(f"skipped (--skip-unreadable): {reason}", file=sys.stderr)
    left_out = left_out_channels(trials)
    print(f"features of {len(trials)} trials, {sum(t.from_cache for t in trials)} of them from {cache_dir}/"
          + (f"; {len(skipped)} left out, their recordings unusable" if skipped else "")
          + "".join(f"; {len(trial_ids)} with {kind} channels left out" for kind, trial_ids in left_out.items()
                    if trial_ids))
    return Inputs(trials, skipped, left_out, source, dreamer_path, mahnob_root)


def left_out_channels(trials):
    """{kind: {trial: [channels]}} of the constant and noisy channels left out, each named on stderr."""
    left_out = {"constant": {}, "noisy": {}}
    for trial in trials:
        for kind, names in (("constant", trial.constant_channels), ("noisy", trial.noisy_channels)):
            if names:
                left_out[kind][trial.trial_id] = list(names)
                print(f"{trial.recording}: {trial.trial_id}: {kind} channels left out, their places on the maps "
                      f"interpolated from the other channels: {', '.join(names)}", file=sys.stderr)
    return left_out


class Windows(NamedTuple):
    """The training and held-out windows' standardised maps and targets, with the held-out windows' provenance."""
    train_maps: np.ndarray
    train_targets: np.ndarray
    test_maps: np.ndarray
    test_targets: np.ndarray
    test_subjects: np.ndarray
    test_trial_ids: np.ndarray
    test_datasets: np.ndarray
    mean: np.ndarray  # the training windows' feature standardisation
    std: np.ndarray


def held_out_windows(trials, args, note):
    """Whole subjects held out, and every window's map, standardised by the training windows alone."""
    subjects_by_dataset = {}
    for trial in trials:
        subjects_by_dataset.setdefault(trial.dataset, set()).add(trial.subject)
    held_out = split_subjects(subjects_by_dataset, args.held_out_fraction, args.seed)
    if not held_out:
        raise EEGFormatError("a held-out split needs at least 2 subjects in one dataset")
    print(f"{len(trials)} trials of {sum(len(s) for s in subjects_by_dataset.values())} subjects "
          f"({', '.join(f'{d}: {len(s)}' for d, s in sorted(subjects_by_dataset.items()))}); "
          f"held out: {sorted(held_out)}{note}")
    matrices = {names: interpolation_matrix(names, args.map_size) for names in {t.ch_names for t in trials}}
    train_maps, train_v, train_a, train_subjects, _, _ = window_data(
        [t for t in trials if t.subject not in held_out], matrices, args.map_size)
    test_maps, test_v, test_a, test_subjects, test_trial_ids, test_datasets = window_data(
        [t for t in trials if t.subject in held_out], matrices, args.map_size)
    assert not set(train_subjects) & set(test_subjects)
    mean = train_maps.mean(axis=0, keepdims=True)
    std = train_maps.std(axis=0, keepdims=True) + 1e-6
    print(f"{len(train_maps)} training and {len(test_maps)} held-out windows of {len(BANDS)} x {args.map_size} x "
          f"{args.map_size} maps")
    return Windows((train_maps - mean) / std, np.stack([train_v, train_a], axis=1), (test_maps - mean) / std,
                   np.stack([test_v, test_a], axis=1), test_subjects, test_trial_ids, test_datasets, mean, std)


def train_one_epoch(model, optimizer, train_x, train_y, args):
    """One pass over the training windows in a random order; the mean loss of its steps."""
    model.train()
    order = torch.randperm(len(train_x)).to(train_x.device)
    losses = []
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        if len(batch) < 2:
            continue  # BatchNorm and the CCC need two samples
        prediction, _ = model(train_x[batch])
        target = train_y[batch]
        loss = (1 - ccc(prediction, target)).mean() if args.loss == "ccc" else F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())  # kept as a tensor: a step waits for nothing
    return torch.stack(losses).double().mean().item()


def train(model, optimizer, windows, args, config, checkpoint_path):
    """Every epoch after the checkpoint's (--resume), each ending in a checkpoint; returns the history."""
    history, start_epoch = [], 0
    checkpoint = artifacts.resume_checkpoint(checkpoint_path, config, args.resume)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history, start_epoch = checkpoint["history"], checkpoint["epoch"]
        torch.set_rng_state(checkpoint["rng"])
        print(f"resuming after epoch {start_epoch}")
    elif args.resume:
        print(f"--resume: no checkpoint at {checkpoint_path} (none was left, or the run finished); starting afresh")
    device = next(model.parameters()).device
    # On the training device whole (both datasets' maps take about half a GB), so that a step copies nothing.
    train_x = torch.from_numpy(windows.train_maps).to(device)
    train_y = torch.from_numpy(windows.train_targets).to(device)
    progress = tqdm(range(start_epoch + 1, args.epochs + 1), desc="training", unit="epoch")
    for epoch in progress:
        loss = train_one_epoch(model, optimizer, train_x, train_y, args)
        scores = regression_metrics(predict(model, windows.test_maps, device, 256)[0], windows.test_targets)
        history.append({"epoch": epoch, "train_loss": loss, "held_out": scores})
        progress.set_postfix(loss=f"{loss:.4f}", ccc_valence=f"{scores['valence']['ccc']:.3f}",
                             ccc_arousal=f"{scores['arousal']['ccc']:.3f}")
        artifacts.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                                   "history": history, "config": config, "rng": torch.get_rng_state()},
                                  checkpoint_path)
    return history


def held_out_report(prediction, windows, inputs, args):
    """metrics.json: the held-out scores pooled, per dataset and per subject, each beside a mean baseline, with their
    intervals over the held-out subjects; and what was left out."""
    targets, subjects = windows.test_targets, windows.test_subjects
    baseline = np.broadcast_to(windows.train_targets.mean(axis=0), targets.shape)

    def scores(mask):
        return held_out_scores(prediction[mask], targets[mask], subjects[mask], args.bootstrap, args.seed)

    # Papers report each dataset on its own; the two differ in headset, stimuli and rating scale.
    by_dataset = {name: {"windows": int(mask.sum()), "subjects": len(set(subjects[mask])), "held_out": scores(mask),
                         "mean_baseline": regression_metrics(baseline[mask], targets[mask])}
                  for name in sorted(set(windows.test_datasets)) for mask in [windows.test_datasets == name]}
    # A few held-out subjects, and a teacher may read some far better than others: pooled figures alone would hide it.
    by_subject = {subject: {"windows": int(mask.sum()), "trials": len(set(windows.test_trial_ids[mask])),
                            "held_out": scores(mask)}
                  for subject in sorted(set(subjects)) for mask in [subjects == subject]}
    metrics = {"held_out": scores(np.ones(len(subjects), bool)), "mean_baseline": regression_metrics(baseline, targets),
               "by_dataset": by_dataset, "by_subject": by_subject, "held_out_subjects": sorted(set(subjects)),
               "windows": {"train": len(windows.train_maps), "held_out": len(windows.test_maps)},
               "bootstrap": {"resamples": args.bootstrap, "level": BOOTSTRAP_LEVEL, "seed": args.seed,
                             "method": "percentile bootstrap over the held-out subjects, each drawn with all its "
                                       "windows; none where one subject is held out"},
               "skipped_trials": inputs.skipped, "constant_channels": inputs.left_out["constant"],
               "noisy_channels": inputs.left_out["noisy"], "source": inputs.source}
    if inputs.source == "synthetic":
        metrics["note"] = "synthetic EEG: these numbers are not the paper's"
    return metrics


def print_report(metrics, note):
    subjects = len(metrics["by_subject"])
    print(f"held-out scores, with their {BOOTSTRAP_LEVEL:.0%} intervals over the {subjects} held-out subjects:"
          if subjects > 1 else "held-out scores (one held-out subject: no intervals):")
    for name in VA_DIMENSIONS:
        got, base = metrics["held_out"][name], metrics["mean_baseline"][name]
        print(f"  {name}: CCC {with_interval(got, 'ccc')} (mean baseline {base['ccc']:.3f}), r "
              f"{with_interval(got, 'pearson_r')}, RMSE {with_interval(got, 'rmse')} "
              f"(baseline {base['rmse']:.3f}){note}")
    for dataset, scores in metrics["by_dataset"].items():
        counted = f"{scores['subjects']} subject" + ("s" if scores["subjects"] > 1 else "")
        print(f"  {dataset} ({scores['windows']} windows of {counted}): CCC valence "
              f"{with_interval(scores['held_out']['valence'], 'ccc')}, arousal "
              f"{with_interval(scores['held_out']['arousal'], 'ccc')}{note}")
    spans = {name: [scores["held_out"][name]["ccc"] for scores in metrics["by_subject"].values()]
             for name in VA_DIMENSIONS}
    print(f"  subject by subject ({subjects} held out; metrics.json by_subject): CCC valence "
          f"{min(spans['valence']):.2f} to {max(spans['valence']):.2f}, arousal {min(spans['arousal']):.2f} to "
          f"{max(spans['arousal']):.2f}{note}")


def write_outputs(out_dir, model, config, windows, inputs, history, metrics, held_out, args, note):
    """The stage folder, written beside the old one and swapped in whole: a run that fails or is killed leaves the
    previous teacher and its embeddings as they were, and never a folder that looks finished. held_out: the
    teacher's (prediction, embeddings) of the held-out windows."""
    prediction, embeddings = held_out
    norms = np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-8)
    bdf_hashes = {os.path.relpath(t.recording, inputs.mahnob): t.content_sha256
                  for t in inputs.trials if t.dataset == MahnobSession.dataset}
    with artifacts.atomic_dir(out_dir) as staging:
        artifacts.save_checkpoint({"state_dict": model.state_dict(), "config": config,
                                   "feature_mean": torch.from_numpy(windows.mean),
                                   "feature_std": torch.from_numpy(windows.std)}, os.path.join(staging, "teacher.pt"))
        save_embeddings(os.path.join(staging, "embeddings.npz"), embeddings / norms, *windows.test_targets.T,
                        windows.test_subjects, windows.test_trial_ids, inputs.source)
        artifacts.write_json(os.path.join(staging, "metrics.json"), metrics)
        plot_curve(history, os.path.join(staging, "training_curve.png"), note)
        plot_held_out(prediction, windows.test_targets, windows.test_datasets, windows.test_trial_ids, metrics,
                      os.path.join(staging, "held_out.png"), note)
        artifacts.write_config(staging, args, {
            "dreamer": artifacts.sha256_file(inputs.dreamer) if inputs.dreamer else None,
            "mahnob": {"root": inputs.mahnob, "bdf_sha256": bdf_hashes} if inputs.mahnob else None})
        artifacts.write_manifest(staging)


def main(argv=None):
    args = parse_args(argv)
    out_dir = os.path.join(args.run_dir, "stage1")
    with artifacts.folder_lock(out_dir):  # one writer: a second run stops at once
        set_determinism(args.deterministic)
        torch.manual_seed(args.seed)
        inputs = load_trials(args)
        note = " (synthetic data: not the paper's numbers)" if inputs.source == "synthetic" else ""
        windows = held_out_windows(inputs.trials, args, note)
        model = Teacher(len(BANDS), args.embedding_size).to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        config = {name: value for name, value in vars(args).items()
                  if name not in ("device", "run_dir", "workers", "resume", "bootstrap")}
        config.update(source=inputs.source, bands=list(BANDS), sfreq=SFREQ)
        # Beside the stage folder, not in it: the manifest lists the folder's files, and must never list this one.
        checkpoint_path = os.path.join(f"{out_dir}.partial", "checkpoint.pt")
        history = train(model, optimizer, windows, args, config, checkpoint_path)
        held_out = predict(model, windows.test_maps, args.device, 256)
        metrics = held_out_report(held_out[0], windows, inputs, args)
        write_outputs(out_dir, model, config, windows, inputs, history, metrics, held_out, args, note)
        artifacts.remove_tree(os.path.dirname(checkpoint_path), out_dir)
    print_report(metrics, note)
    print(f"wrote {out_dir}/")


if __name__ == "__main__":
    try:
        main()
    except (EEGFormatError, artifacts.ArtifactError) as error:
        sys.exit(f"stage1_teacher.py: {error}")
