"""The embedded default EEG: synthetic DREAMER and MAHNOB-HCI recordings, written in their real formats.

Deterministic from a seed. Each channel is a mix of theta, alpha, beta and gamma oscillations with drifting
phase, plus 1/f noise. The emotion correlates are the textbook ones:

- valence: frontal alpha asymmetry. Alpha power falls with cortical activity, and positive affect goes with
  more left-frontal activity: higher valence lowers left-frontal alpha and raises right-frontal alpha.
- arousal: beta and gamma power rise with arousal on every channel.

Subjects differ by an overall gain and a per-channel gain (which a baseline correction removes) and by how
strongly they express each correlate; every trial also has its own random band powers, unrelated to its
labels. Baselines are recorded at neutral valence and arousal. The MAHNOB-HCI recordings are stored as a BioSemi
amplifier stores them, against its CMS electrode: each channel sits off zero by an electrode offset of its own, and
all carry the same mains hum and slow drift, which the average reference takes out. These are synthetic data:
nothing learned or measured on them says anything about real EEG.
"""

import os

import numpy as np

from ngd_ext.artifacts import atomic_dir, folder_lock
from ngd_ext.data.eeg import DREAMER_ELECTRODES, MAHNOB_EEG, write_bdf, write_dreamer, write_session_xml

BANDS_HZ = {"theta": 6.0, "alpha": 10.0, "beta": 20.0, "gamma": 36.0}
BASE_AMPLITUDE_UV = {"theta": 6.0, "alpha": 9.0, "beta": 3.5, "gamma": 1.5}
LEFT_FRONTAL = {"Fp1", "AF3", "F3", "F7", "FC5", "FC1"}
RIGHT_FRONTAL = {"Fp2", "AF4", "F4", "F8", "FC6", "FC2"}

DREAMER_SFREQ = 128
DREAMER_BASELINE_S = 61
MAHNOB_SFREQ = 256
MAHNOB_BASELINE_S = 30
ELECTRODE_OFFSET_UV = 25000.0  # BioSemi's active electrodes sit up to tens of millivolts off zero
MAINS_HZ, MAINS_UV = 50.0, 40.0
DRIFT_HZ, DRIFT_UV = 0.05, 300.0


def _oscillation(rng, frequency, seconds, sfreq):
    """A band-limited oscillation: a carrier whose frequency wanders by +-15% and whose envelope breathes."""
    samples = int(seconds * sfreq)
    wander = np.cumsum(rng.normal(0, 0.02, samples))
    wander = 0.15 * wander / (np.abs(wander).max() + 1e-12)
    phase = 2 * np.pi * np.cumsum(frequency * (1 + wander)) / sfreq + rng.uniform(0, 2 * np.pi)
    envelope = 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * np.arange(samples) / sfreq)
    return envelope * np.sin(phase)


def _pink_noise(rng, channels, samples):
    spectrum = np.fft.rfft(rng.normal(size=(channels, samples)), axis=1)
    frequencies = np.fft.rfftfreq(samples)
    spectrum[:, 1:] /= np.sqrt(frequencies[1:])
    spectrum[:, 0] = 0
    noise = np.fft.irfft(spectrum, n=samples, axis=1)
    return noise / noise.std(axis=1, keepdims=True)


def synthesize(rng, ch_names, seconds, sfreq, valence, arousal, subject):
    """channels x samples of EEG in microvolts for one (valence, arousal) in [-1, 1]."""
    samples = int(seconds * sfreq)
    signal = 4.0 * _pink_noise(rng, len(ch_names), samples)
    trial_power = {band: rng.lognormal(0.0, 0.2) for band in BANDS_HZ}
    for c, name in enumerate(ch_names):
        for band, frequency in BANDS_HZ.items():
            amplitude = BASE_AMPLITUDE_UV[band] * trial_power[band]
            if band == "alpha" and name in LEFT_FRONTAL:
                amplitude *= 1 - subject["asymmetry"] * valence
            elif band == "alpha" and name in RIGHT_FRONTAL:
                amplitude *= 1 + subject["asymmetry"] * valence
            elif band in ("beta", "gamma"):
                amplitude *= 1 + subject["arousal_gain"] * arousal
            signal[c] += amplitude * _oscillation(rng, frequency, seconds, sfreq)
    return subject["gain"] * subject["channel_gain"][: len(ch_names), None] * signal


def against_cms(rng, recording, sfreq):
    """channels x samples in microvolts as a BioSemi amplifier stores them, against its CMS electrode: each channel
    with an electrode offset of its own, and every channel with the same mains hum and slow drift."""
    seconds = np.arange(recording.shape[1]) / sfreq
    common = (MAINS_UV * np.sin(2 * np.pi * MAINS_HZ * seconds + rng.uniform(0, 2 * np.pi))
              + DRIFT_UV * np.sin(2 * np.pi * DRIFT_HZ * seconds + rng.uniform(0, 2 * np.pi)))
    offsets = rng.uniform(-ELECTRODE_OFFSET_UV, ELECTRODE_OFFSET_UV, (len(recording), 1))
    return recording + offsets + common


def _subject(rng, channels):
    return {"gain": rng.uniform(0.7, 1.4), "channel_gain": rng.uniform(0.8, 1.25, channels),
            "asymmetry": rng.uniform(0.2, 0.35), "arousal_gain": rng.uniform(0.3, 0.5)}


def write_synthetic_dreamer(path, seed, subjects=8, clips=6, seconds=20):
    """DREAMER.mat with integer scores 1..5; DC offset and units as the Emotiv EPOC records them."""
    rng = np.random.default_rng([seed, 1])
    content = []
    for _ in range(subjects):
        person = _subject(rng, len(DREAMER_ELECTRODES))
        valence_scores = rng.integers(1, 6, clips)
        arousal_scores = rng.integers(1, 6, clips)
        stimuli, baselines = [], []
        for v, a in zip(valence_scores, arousal_scores):
            stimuli.append(4200 + synthesize(rng, DREAMER_ELECTRODES, seconds, DREAMER_SFREQ, (v - 3) / 2,
                                             (a - 3) / 2, person).T)
            baselines.append(4200 + synthesize(rng, DREAMER_ELECTRODES, DREAMER_BASELINE_S, DREAMER_SFREQ, 0.0, 0.0,
                                               person).T)
        content.append(dict(stimuli=stimuli, baseline=baselines, valence=valence_scores, arousal=arousal_scores))
    write_dreamer(path, content, sfreq=DREAMER_SFREQ, note="synthetic DREAMER-structured data (NeuroGaze-Distill)")


def write_synthetic_mahnob(root, seed, subjects=6, sessions_per_subject=4, seconds=20, unlabelled=1):
    """Sessions/<id>/session.xml + Part_<s>_S_Trial<k>_emotion.bdf (against CMS), scores 1..9, 30 s baseline before
    the first Status event; the last `unlabelled` sessions lack felt scores, as some real sessions do."""
    rng = np.random.default_rng([seed, 2])
    channels = list(MAHNOB_EEG) + ["EXG1", "EXG2"]
    session_id = 0
    for s in range(1, subjects + 1):
        person = _subject(rng, len(channels))
        order = list(rng.permutation(channels))  # channel order on disk is not the canonical one
        for k in range(1, sessions_per_subject + 1):
            session_id += 1
            folder = os.path.join(root, "Sessions", str(session_id))
            os.makedirs(folder, exist_ok=True)
            labelled = session_id <= subjects * sessions_per_subject - unlabelled
            v, a = (int(rng.integers(1, 10)), int(rng.integers(1, 10)))
            write_session_xml(os.path.join(folder, "session.xml"), session_id, s,
                              *((v, a) if labelled else (None, None)))
            baseline = synthesize(rng, channels, MAHNOB_BASELINE_S + 2, MAHNOB_SFREQ, 0.0, 0.0, person)
            stimulus = synthesize(rng, channels, seconds, MAHNOB_SFREQ, (v - 5) / 4, (a - 5) / 4, person)
            tail = synthesize(rng, channels, 2, MAHNOB_SFREQ, 0.0, 0.0, person)
            recording = against_cms(rng, np.concatenate([baseline, stimulus, tail], axis=1), MAHNOB_SFREQ)
            status = np.zeros(recording.shape[1])
            start = baseline.shape[1]
            stop = start + stimulus.shape[1]
            status[start:start + 8] = 1
            status[stop:stop + 8] = 2
            picks = [channels.index(name) for name in order]
            write_bdf(os.path.join(folder, f"Part_{s}_S_Trial{k}_emotion.bdf"), order, recording[picks],
                      MAHNOB_SFREQ, status)


def ensure_synthetic_eeg(folder, seed, **sizes):
    """Write the synthetic DREAMER.mat and MAHNOB tree under folder unless a finished copy is there.

    Returns (dreamer_path, mahnob_root). The set is written whole or not at all (a killed generation starts
    again), and its marker file says which seed and sizes it holds.
    """
    dreamer = os.path.join(folder, "DREAMER.mat")
    mahnob = os.path.join(folder, "MAHNOB-HCI")
    marker = os.path.join(folder, "COMPLETE")
    wanted = f"seed={seed} {sorted(sizes.items())}\n"
    with folder_lock(folder, wait=True):
        if os.path.exists(marker):
            with open(marker) as handle:
                if handle.read() == wanted:
                    return dreamer, mahnob
        with atomic_dir(folder) as staging:
            write_synthetic_dreamer(os.path.join(staging, "DREAMER.mat"), seed, **{
                k[len("dreamer_"):]: v for k, v in sizes.items() if k.startswith("dreamer_")})
            write_synthetic_mahnob(os.path.join(staging, "MAHNOB-HCI"), seed, **{
                k[len("mahnob_"):]: v for k, v in sizes.items() if k.startswith("mahnob_")})
            with open(os.path.join(staging, "COMPLETE"), "w") as handle:
                handle.write(wanted)
    return dreamer, mahnob
