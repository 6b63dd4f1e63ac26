"""A trial's features, taken once: the band entropy of every window of a DREAMER clip or a MAHNOB-HCI session, in a
worker process, cached under the recording's content, the settings and the code that takes them."""

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from ngd_ext import artifacts
from ngd_ext.data import eeg, eeg_features
from ngd_ext.data.eeg import (EEGFormatError, MahnobSession, average_referenced, read_mahnob_trial,
                              without_unusable_channels)
from ngd_ext.data.eeg_features import SFREQ, recording_entropy


@dataclass
class TrialEntropy:
    entropy: np.ndarray  # windows x bands x channels
    dataset: str
    subject: str
    trial_id: str
    ch_names: tuple
    constant_channels: tuple  # left out by without_unusable_channels; ch_names holds the channels kept
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
    return [artifacts.sha256_file(module.__file__) for module in (eeg_features, eeg, sys.modules[__name__])] + sorted(
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
