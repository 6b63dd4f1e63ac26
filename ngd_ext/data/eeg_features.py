"""EEG features for the teacher: topographic maps of band differential entropy.

A trial is band-passed (4-45 Hz, mains above it stopped) and resampled to a common rate with MNE, cut into
windows, and for each band (theta, alpha, beta, gamma) and channel the differential entropy of the band-passed
window is taken, minus its mean over the trial's own baseline (which removes per-subject and per-channel
gain). The channels' values are then spread onto a 2-D scalp image by one precomputed interpolation matrix
(standard 10-20 positions from MNE's montage), applied to all windows at once by a matrix product. DREAMER's
14 Emotiv channels and MAHNOB-HCI's 32 BioSemi channels land on the same image grid, so the two datasets train
one network.
"""

import mne
import numpy as np

SFREQ = 128  # the features' common sampling rate, Hz
BANDS = {"theta": (4.0, 8.0), "alpha": (8.0, 13.0), "beta": (13.0, 30.0), "gamma": (30.0, 45.0)}
BROADBAND = (4.0, 45.0)
# Both edges of BROADBAND fall off over 2 Hz, so that 50 Hz mains is stopped (below -60 dB). MNE's automatic
# upper transition, a quarter of 45 Hz, would pass it at about -5 dB, into the gamma band.
BROADBAND_TRANSITION_HZ = 2.0


def preprocess(signal, baseline, sfreq, target_sfreq):
    """Band-pass 4-45 Hz, then resample to target_sfreq. The baseline and the signal are filtered as one
    recording (baseline first, as recorded), so that the filter has no edge at the stimulus onset."""
    joined = np.concatenate([baseline, signal], axis=1)
    joined = mne.filter.filter_data(joined, sfreq, *BROADBAND, l_trans_bandwidth=BROADBAND_TRANSITION_HZ,
                                    h_trans_bandwidth=BROADBAND_TRANSITION_HZ, verbose="error")
    if sfreq != target_sfreq:
        joined = mne.filter.resample(joined, up=target_sfreq, down=sfreq, verbose="error")
    split = int(round(baseline.shape[1] * target_sfreq / sfreq))
    return joined[:, split:], joined[:, :split]


def windows(signal, sfreq, window_s, step_s):
    """channels x samples -> n x channels x window views, n >= 0."""
    size, step = int(round(window_s * sfreq)), int(round(step_s * sfreq))
    if signal.shape[1] < size:
        return np.empty((0, signal.shape[0], size))
    view = np.lib.stride_tricks.sliding_window_view(signal, size, axis=1)[:, ::step]
    return np.moveaxis(view, 1, 0)


def differential_entropy(segments):
    """0.5 log(2 pi e var) over the last axis: the entropy of a Gaussian with the segments' variance."""
    return 0.5 * np.log(2 * np.pi * np.e * np.maximum(segments.var(axis=-1), 1e-30))


def band_entropy(signal, baseline, sfreq, window_s, step_s):
    """windows x bands x channels: differential entropy per band, minus its mean over baseline windows."""
    features = []
    for low, high in BANDS.values():
        band_signal = mne.filter.filter_data(np.concatenate([baseline, signal], axis=1), sfreq, low, high,
                                             verbose="error")
        reference = differential_entropy(windows(band_signal[:, : baseline.shape[1]], sfreq, window_s, step_s))
        current = differential_entropy(windows(band_signal[:, baseline.shape[1]:], sfreq, window_s, step_s))
        features.append(current - (reference.mean(axis=0) if len(reference) else 0.0))
    return np.stack(features, axis=1)


def recording_entropy(signal, baseline, sfreq, target_sfreq, window_s, step_s):
    """windows x bands x channels for one recording at sfreq: preprocess, then band_entropy at target_sfreq."""
    signal, baseline = preprocess(signal, baseline, sfreq, target_sfreq)
    return band_entropy(signal, baseline, target_sfreq, window_s, step_s)


def scalp_coordinates(ch_names):
    """2-D positions of 10-20 electrodes: the azimuthal equidistant projection of MNE's colin27_1020
    montage, in which the equator (T7, T8) lies near radius 1."""
    positions = mne.channels.make_standard_montage("colin27_1020").get_positions()["ch_pos"]
    missing = [name for name in ch_names if name not in positions]
    if missing:
        raise ValueError(f"channels {missing} have no position in the standard 10-20 montage")
    xyz = np.array([positions[name] for name in ch_names])
    unit = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    polar = np.arccos(np.clip(unit[:, 2], -1, 1)) / (np.pi / 2)
    azimuth = np.arctan2(unit[:, 1], unit[:, 0])
    return np.stack([polar * np.cos(azimuth), polar * np.sin(azimuth)], axis=1)


def interpolation_matrix(ch_names, size):
    """(size * size) x channels: inverse-square-distance weights from each electrode to each pixel of a
    size x size image of the head; pixels outside the head (radius 1.1) are zero. Rows inside sum to 1."""
    electrodes = scalp_coordinates(ch_names)
    axis = np.linspace(-1.1, 1.1, size)
    pixels = np.stack(np.meshgrid(axis, axis[::-1], indexing="xy"), axis=-1).reshape(-1, 2)  # row 0 = front
    distance_sq = ((pixels[:, None, :] - electrodes[None, :, :]) ** 2).sum(-1)
    weights = 1.0 / np.maximum(distance_sq, 1e-6)
    weights /= weights.sum(axis=1, keepdims=True)
    weights[np.linalg.norm(pixels, axis=1) > 1.1] = 0.0
    return weights


def topographic_maps(features, matrix, size):
    """windows x bands x channels -> windows x bands x size x size, one matrix product for all windows."""
    return (features @ matrix.T).reshape(*features.shape[:2], size, size)
