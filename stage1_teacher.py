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
import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ngd_ext import artifacts, cli, eeg_features, eeg_formats  # noqa: E402
from ngd_ext.determinism import set_determinism  # noqa: E402
from ngd_ext.eeg_features import BANDS, interpolation_matrix, recording_entropy, topographic_maps  # noqa: E402
from ngd_ext.eeg_formats import (NOISY_AMPLITUDE_RATIO, EEGFormatError, MahnobScan, MahnobSession,  # noqa: E402
                                 average_referenced, iter_dreamer, read_mahnob_trial, scan_mahnob,
                                 without_unusable_channels)
from ngd_ext.emotions import VA_DIMENSIONS  # noqa: E402
from ngd_ext.metrics import BOOTSTRAP_LEVEL, intervals, regression_bootstrap, regression_metrics  # noqa: E402
from ngd_ext.parallel import default_workers, map_in_processes  # noqa: E402
from ngd_ext.synthetic_eeg import ensure_synthetic_eeg  # noqa: E402
from ngd_ext.teacher_embeddings import save_embeddings  # noqa: E402

# Defaults ---------------------------------------------------------------------------------------------------
RUN_DIR = "runs/demo"
SFREQ = 128            # common sampling rate after resampling, Hz
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


@dataclass
class TrialEntropy:
    entropy: np.ndarray  # windows x bands x channels
    dataset: str
    subject: str
    trial_id: str
    ch_names: tuple
    constant_channels: tuple  # left out by eeg_formats.without_unusable_channels; ch_names holds the channels kept
    noisy_channels: tuple     # left out likewise
    valence: float
    arousal: float
    recording: str       # the file it came from
    content_sha256: str  # of the recording: a MAHNOB-HCI session's BDF, a DREAMER clip's samples
    from_cache: bool


@functools.cache
def feature_code_fingerprint():
    """What a trial's features depend on besides its recording and the settings: the code that reads and filters
    recordings, and the packages it calls."""
    return [artifacts.sha256_file(module.__file__) for module in (eeg_features, eeg_formats)] + sorted(
        artifacts.package_versions(("numpy", "scipy", "mne")).items())


def dreamer_clip_sha256(trial):
    """The SHA-256 of a DREAMER clip as read: its sampling rate, channels and samples (baseline, then stimulus)."""
    digest = hashlib.sha256(json.dumps([trial.sfreq, list(trial.ch_names)]).encode())
    for samples in (trial.baseline, trial.signal):
        digest.update(np.ascontiguousarray(samples, dtype=np.float64).data)
    return digest.hexdigest()


def read_cached_entropy(path):
    """(entropy, ch_names, constant_channels, noisy_channels) from a cache entry, or None where there is none or it
    cannot be read (then it is taken anew and rewritten)."""
    return artifacts.read_cache_entry(path, lambda entry: (entry["entropy"], *(
        tuple(entry[name].tolist()) for name in ("ch_names", "constant_channels", "noisy_channels"))))


def trial_entropy(source, window_s, step_s, noisy_ratio, cache_dir):
    """The band entropy of every window of one trial (a DREAMER Trial, or a MAHNOB-HCI session, whose BDF is read
    here unless its features are cached). Runs in a worker process (in this one with --workers 1), which returns
    only the features.

    Features are cached in cache_dir under a key made of the recording's content, the settings and
    feature_code_fingerprint(), so that a rerun, or a killed run started again, takes each trial's from there:
    hashing a BDF costs a small part of reading and filtering it."""
    if isinstance(source, MahnobSession):
        try:
            trial, content, recording = None, artifacts.sha256_file(source.bdf), source.bdf
        except OSError as error:
            raise EEGFormatError(f"{source.bdf}: cannot be read ({error.strerror})") from error
    else:
        trial, content, recording = source, dreamer_clip_sha256(source), source.source
    key = json.dumps([content, SFREQ, window_s, step_s, noisy_ratio, feature_code_fingerprint()])
    cache_path = os.path.join(cache_dir, f"{source.dataset}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz")
    cached = read_cached_entropy(cache_path)
    if cached is not None:
        entropy, ch_names, constant, noisy = cached
    else:
        trial, constant, noisy = without_unusable_channels(trial or read_mahnob_trial(source), noisy_ratio)
        trial = average_referenced(trial)
        entropy = recording_entropy(trial.signal, trial.baseline, trial.sfreq, SFREQ, window_s, step_s)
        ch_names = trial.ch_names
        if not len(entropy):
            raise EEGFormatError(f"{recording}: {source.subject} trial {source.trial} is shorter than one "
                                 f"{window_s:g} s window")
        with artifacts.atomic_path(cache_path) as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, entropy=entropy, ch_names=np.array(ch_names, dtype=str),
                         constant_channels=np.array(constant, dtype=str), noisy_channels=np.array(noisy, dtype=str))
    return TrialEntropy(entropy, source.dataset, source.subject, f"{source.subject}/{source.trial}", ch_names,
                        constant, noisy, source.valence, source.arousal, recording, content,
                        from_cache=cached is not None)


def trial_entropy_or_stop(source, **settings):
    """trial_entropy, whose error, which stops the run, adds that --skip-unreadable would leave the trial out."""
    try:
        return trial_entropy(source, **settings)
    except EEGFormatError as error:
        hint = "--skip-unreadable leaves out, and lists, each trial that cannot be used"
        raise EEGFormatError(f"{error} ({hint})") from error


def trial_entropy_or_skip(source, **settings):
    """trial_entropy, or, where the trial's recording cannot be used, the error's message, which names the file
    (--skip-unreadable)."""
    try:
        return trial_entropy(source, **settings)
    except EEGFormatError as error:
        return str(error)


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


def main(argv=None):
    args = parse_args(argv)
    with artifacts.folder_lock(os.path.join(args.run_dir, "stage1")):  # one writer: a second run stops at once
        train_teacher(args)


def train_teacher(args):
    set_determinism(args.deterministic)
    out_dir = os.path.join(args.run_dir, "stage1")
    torch.manual_seed(args.seed)

    # Data: real files when given, the embedded synthetic default otherwise --------------------------------
    if args.dreamer or args.mahnob:
        dreamer_path, mahnob_root, source = args.dreamer, args.mahnob, "real"
    else:
        dreamer_path, mahnob_root = ensure_synthetic_eeg(os.path.join(args.run_dir, "data", "synthetic_eeg"),
                                                         args.data_seed, **SYNTHETIC_SIZES[args.synthetic_size])
        source = "synthetic"
    note = " (synthetic data: not the paper's numbers)" if source == "synthetic" else ""
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
    left_out = {"constant": {}, "noisy": {}}  # kind -> trial -> channels, for metrics.json
    for trial in trials:
        for kind, names in (("constant", trial.constant_channels), ("noisy", trial.noisy_channels)):
            if names:
                left_out[kind][trial.trial_id] = list(names)
                print(f"{trial.recording}: {trial.trial_id}: {kind} channels left out, their places on the maps "
                      f"interpolated from the other channels: {', '.join(names)}", file=sys.stderr)
    print(f"features of {len(trials)} trials, {sum(t.from_cache for t in trials)} of them from {cache_dir}/"
          + (f"; {len(skipped)} left out, their recordings unusable" if skipped else "")
          + "".join(f"; {len(trial_ids)} with {kind} channels left out" for kind, trial_ids in left_out.items()
                    if trial_ids))
    subjects_by_dataset = {}
    for trial in trials:
        subjects_by_dataset.setdefault(trial.dataset, set()).add(trial.subject)
    held_out = split_subjects(subjects_by_dataset, args.held_out_fraction, args.seed)
    if not held_out:
        sys.exit("stage1_teacher.py: a held-out split needs at least 2 subjects in one dataset")
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
    train_maps, test_maps = (train_maps - mean) / std, (test_maps - mean) / std
    train_targets = np.stack([train_v, train_a], axis=1)
    test_targets = np.stack([test_v, test_a], axis=1)
    print(f"{len(train_maps)} training and {len(test_maps)} held-out windows of {len(BANDS)} x {args.map_size} x "
          f"{args.map_size} maps")

    # Model and optimiser, with --resume from the last finished epoch of a killed run ---------------------------
    device = torch.device(args.device)
    model = Teacher(len(BANDS), args.embedding_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    config = {name: value for name, value in vars(args).items()
              if name not in ("device", "run_dir", "workers", "resume", "bootstrap")}
    config.update(source=source, bands=list(BANDS), sfreq=SFREQ)
    # Beside the stage folder, not in it: the manifest lists the folder's files, and must never list this one.
    checkpoint_path = os.path.join(f"{out_dir}.partial", "checkpoint.pt")
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

    # Training ---------------------------------------------------------------------------------------------
    # On the training device whole (both datasets' maps take about half a GB), so that a step copies nothing and,
    # its loss kept as a tensor, waits for nothing.
    train_x = torch.from_numpy(train_maps).to(device)
    train_y = torch.from_numpy(train_targets).to(device)
    progress = tqdm(range(start_epoch + 1, args.epochs + 1), desc="training", unit="epoch")
    for epoch in progress:
        model.train()
        order = torch.randperm(len(train_x)).to(device)
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
            losses.append(loss.detach())
        held_out_prediction, _ = predict(model, test_maps, device, 256)
        history.append({"epoch": epoch, "train_loss": torch.stack(losses).double().mean().item(),
                        "held_out": regression_metrics(held_out_prediction, test_targets)})
        scores = history[-1]["held_out"]
        progress.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", ccc_valence=f"{scores['valence']['ccc']:.3f}",
                             ccc_arousal=f"{scores['arousal']['ccc']:.3f}")
        artifacts.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                                   "history": history, "config": config, "rng": torch.get_rng_state()},
                                  checkpoint_path)

    # Outputs: written beside the old folder and swapped in whole at the end, so a run that fails or is killed
    # leaves the previous teacher and its embeddings as they were, and never a folder that looks finished. -------
    prediction, embeddings = predict(model, test_maps, device, 256)
    baseline = np.broadcast_to(train_targets.mean(axis=0), test_targets.shape)
    # Papers report each dataset on its own; the two differ in headset, stimuli and rating scale.
    by_dataset = {name: {"windows": int(mask.sum()), "subjects": len(set(test_subjects[mask])),
                         "held_out": held_out_scores(prediction[mask], test_targets[mask], test_subjects[mask],
                                                     args.bootstrap, args.seed),
                         "mean_baseline": regression_metrics(baseline[mask], test_targets[mask])}
                  for name in sorted(set(test_datasets)) for mask in [test_datasets == name]}
    # A quarter of each dataset's subjects are held out, few in number, and a teacher may read some far better than
    # others: the pooled figures alone would hide it.
    by_subject = {subject: {"windows": int(mask.sum()), "trials": len(set(test_trial_ids[mask])),
                            "held_out": held_out_scores(prediction[mask], test_targets[mask], test_subjects[mask],
                                                        args.bootstrap, args.seed)}
                  for subject in sorted(set(test_subjects)) for mask in [test_subjects == subject]}
    metrics = {"held_out": held_out_scores(prediction, test_targets, test_subjects, args.bootstrap, args.seed),
               "mean_baseline": regression_metrics(baseline, test_targets), "by_dataset": by_dataset,
               "by_subject": by_subject,
               "held_out_subjects": sorted(held_out), "windows": {"train": len(train_maps), "held_out": len(test_maps)},
               "bootstrap": {"resamples": args.bootstrap, "level": BOOTSTRAP_LEVEL, "seed": args.seed,
                             "method": "percentile bootstrap over the held-out subjects, each drawn with all its "
                                       "windows; none where one subject is held out"},
               "skipped_trials": skipped, "constant_channels": left_out["constant"],
               "noisy_channels": left_out["noisy"], "source": source}
    if source == "synthetic":
        metrics["note"] = "synthetic EEG: these numbers are not the paper's"
    norms = np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-8)
    bdf_hashes = {os.path.relpath(t.recording, mahnob_root): t.content_sha256
                  for t in trials if t.dataset == MahnobSession.dataset}
    with artifacts.atomic_dir(out_dir) as staging:
        artifacts.save_checkpoint({"state_dict": model.state_dict(), "config": config,
                                   "feature_mean": torch.from_numpy(mean), "feature_std": torch.from_numpy(std)},
                                  os.path.join(staging, "teacher.pt"))
        save_embeddings(os.path.join(staging, "embeddings.npz"), embeddings / norms, test_v, test_a, test_subjects,
                        test_trial_ids, source)
        artifacts.write_json(os.path.join(staging, "metrics.json"), metrics)
        plot_curve(history, os.path.join(staging, "training_curve.png"), note)
        plot_held_out(prediction, test_targets, test_datasets, test_trial_ids, metrics,
                      os.path.join(staging, "held_out.png"), note)
        artifacts.write_config(staging, args, {
            "dreamer": artifacts.sha256_file(dreamer_path) if dreamer_path else None,
            "mahnob": {"root": mahnob_root, "bdf_sha256": bdf_hashes} if mahnob_root else None})
        artifacts.write_manifest(staging)
    artifacts.remove_tree(os.path.dirname(checkpoint_path), out_dir)

    print(f"held-out scores, with their {BOOTSTRAP_LEVEL:.0%} intervals over the {len(by_subject)} held-out subjects:"
          if len(by_subject) > 1 else "held-out scores (one held-out subject: no intervals):")
    for name in VA_DIMENSIONS:
        got, base = metrics["held_out"][name], metrics["mean_baseline"][name]
        print(f"  {name}: CCC {with_interval(got, 'ccc')} (mean baseline {base['ccc']:.3f}), r "
              f"{with_interval(got, 'pearson_r')}, RMSE {with_interval(got, 'rmse')} "
              f"(baseline {base['rmse']:.3f}){note}")
    for dataset, scores in by_dataset.items():
        subjects = f"{scores['subjects']} subject" + ("s" if scores["subjects"] > 1 else "")
        print(f"  {dataset} ({scores['windows']} windows of {subjects}): CCC valence "
              f"{with_interval(scores['held_out']['valence'], 'ccc')}, arousal "
              f"{with_interval(scores['held_out']['arousal'], 'ccc')}{note}")
    spans = {name: [scores["held_out"][name]["ccc"] for scores in by_subject.values()] for name in VA_DIMENSIONS}
    print(f"  subject by subject ({len(by_subject)} held out; metrics.json by_subject): CCC valence "
          f"{min(spans['valence']):.2f} to {max(spans['valence']):.2f}, arousal {min(spans['arousal']):.2f} to "
          f"{max(spans['arousal']):.2f}{note}")
    print(f"wrote {out_dir}/")


if __name__ == "__main__":
    try:
        main()
    except (EEGFormatError, artifacts.ArtifactError) as error:
        sys.exit(f"stage1_teacher.py: {error}")
