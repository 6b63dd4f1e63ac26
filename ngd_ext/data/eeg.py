"""EEG recordings in the on-disk formats of DREAMER and MAHNOB-HCI (SPEC section 6).

Readers for the real files, which give one `Trial` per clip with valence and arousal mapped to [-1, 1], one at a
time (the datasets' samples together take gigabytes), and writers of the same structures, which the synthetic
default and the tests use so that they go through the very readers real data go through.

- DREAMER: one DREAMER.mat, struct DREAMER.Data{1..23} with EEG.stimuli{18} and EEG.baseline{18}
  (samples x 14, microvolts, 128 Hz), ScoreValence and ScoreArousal (1..5), electrodes EEG_Electrodes.
- MAHNOB-HCI: Sessions/<id>/session.xml (attributes feltVlnc, feltArsl, 1..9; sessions without them are
  skipped and counted) and Part_*_S_Trial*_emotion.bdf (32 EEG channels, picked by name; the sampling rate
  read from the file; the trial lies between the first two Status events, with 30 s before it as baseline).

A channel that holds one value throughout a trial's stimulus or baseline recorded nothing there (an electrode off the
scalp, a channel a conversion filled with zeros), and one with ten times the other channels' amplitude recorded
something else (an electrode that lost contact); `without_unusable_channels` leaves both out of that trial. A BioSemi
recording (MAHNOB-HCI) holds each channel against the CMS electrode and is to be re-referenced offline;
`average_referenced` does it, over the channels left.
"""

import glob
import os
import re
import xml.etree.ElementTree as ElementTree
import zlib
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from ngd_ext.artifacts import atomic_path
from ngd_ext.data.eeg_features import BROADBAND, BROADBAND_TRANSITION_HZ

DREAMER_ELECTRODES = ("AF3", "F7", "F3", "FC5", "T7", "P7", "O1", "O2", "P8", "T8", "FC6", "F4", "F8", "AF4")
MAHNOB_EEG = ("Fp1", "AF3", "F3", "F7", "FC5", "FC1", "C3", "T7", "CP5", "CP1", "P3", "P7", "PO3", "O1", "Oz", "Pz",
              "Fp2", "AF4", "Fz", "F4", "F8", "FC6", "FC2", "Cz", "C4", "T8", "CP6", "CP2", "P4", "P8", "PO4", "O2")
MAHNOB_BASELINE_S = 30.0
MICROVOLT = 1e-6
MAX_LEFT_OUT_SHARE = 0.25  # of a trial's channels: with more left out, the scalp map would be mostly interpolation
NOISY_AMPLITUDE_RATIO = 10.0  # 20 dB from the median channel: far beyond the spread of channels that record EEG


class EEGFormatError(ValueError):
    """A recording that does not have the structure of its dataset; the message names the file."""


@dataclass
class Trial:
    dataset: str
    subject: str
    trial: int
    sfreq: float
    ch_names: tuple
    signal: np.ndarray = field(repr=False)    # channels x samples, volts
    baseline: np.ndarray = field(repr=False)  # channels x samples, volts, just before the stimulus
    valence: float                            # [-1, 1]
    arousal: float                            # [-1, 1]
    source: str                               # the file it came from
    needs_average_reference: bool = False     # stored against a CMS electrode (BioSemi): see average_referenced


def without_unusable_channels(trial, noisy_ratio=NOISY_AMPLITUDE_RATIO):
    """(the trial without its unusable channels, the names of the constant ones, the names of the noisy ones).

    A constant channel holds one value throughout the trial's stimulus or baseline: it recorded no EEG there, and
    its band entropy, the logarithm of a zero variance, would put on the scalp map a value no recording gives. A
    noisy channel's amplitude in the feature band (its robust standard deviation at 4-45 Hz, 1.4826 times the median
    absolute deviation, which blinks and brief bursts hardly move) is more than noisy_ratio times the median
    channel's, in the stimulus or the baseline: an electrode that has lost contact picks up far more than EEG, and
    under the average reference would spread it into every channel (noisy_ratio 0 finds none). Amplitudes are taken
    against the channels' median, sample by sample, which one wild channel hardly moves, and which makes them
    independent of where the recording's own reference sat. A channel is not judged for storing little: one beside
    the reference electrode does. Both kinds are left out of the trial, their places on the map filled by the
    interpolation from the others. A trial with more than MAX_LEFT_OUT_SHARE of its channels left out is refused
    (EEGFormatError, naming the file and the channels)."""
    # Imported here: scipy.stats, and MNE (which preprocess imports), take a second that writing files does not need.
    from scipy.stats import median_abs_deviation

    from ngd_ext.data.eeg_features import preprocess

    constant = (np.ptp(trial.signal, axis=1) == 0) | (np.ptp(trial.baseline, axis=1) == 0)
    noisy = np.zeros_like(constant)
    if noisy_ratio and (~constant).any():
        for part in preprocess(trial.signal[~constant], trial.baseline[~constant], trial.sfreq, trial.sfreq):
            if part.shape[1]:
                part = part - np.median(part, axis=0)
                amplitude = median_abs_deviation(part, axis=1, scale="normal")
                noisy[~constant] |= amplitude > noisy_ratio * np.median(amplitude)
    constant_names, noisy_names = (tuple(name for name, out in zip(trial.ch_names, kind) if out)
                                   for kind in (constant, noisy))
    left_out = constant | noisy
    if left_out.sum() > MAX_LEFT_OUT_SHARE * len(trial.ch_names):
        kinds = [f"{kind}: {', '.join(names)}" for kind, names in
                 (("constant", constant_names), (f"noisy, over {noisy_ratio:g}x the median channel's amplitude",
                                                 noisy_names)) if names]
        raise EEGFormatError(f"{trial.source}: {trial.subject} trial {trial.trial} has {left_out.sum()} of its "
                             f"{len(trial.ch_names)} channels unusable in its stimulus or baseline ({'; '.join(kinds)})"
                             f": more than {MAX_LEFT_OUT_SHARE:.0%} would be left out")
    if not left_out.any():
        return trial, constant_names, noisy_names
    return replace(trial, ch_names=tuple(name for name, out in zip(trial.ch_names, left_out) if not out),
                   signal=trial.signal[~left_out], baseline=trial.baseline[~left_out]), constant_names, noisy_names


def average_referenced(trial):
    """The trial re-referenced to the mean of its channels, sample by sample, where its recording asks for it.

    BioSemi amplifiers (MAHNOB-HCI) store every channel against their CMS electrode, with the interference common to
    all channels (mains above all) still in it, and leave the reference to be chosen offline: the average reference
    takes out what the channels share. DREAMER's Emotiv EPOC filters mains out in the headset, and the mean of its 14
    mostly frontal and temporal channels would stand poorly for the scalp's, so its trials stay as recorded. Call it
    after without_unusable_channels: a channel that recorded nothing, or something else than EEG, has no place in
    the mean, and once the mean is taken from a flat one, it no longer looks flat."""
    if not trial.needs_average_reference:
        return trial
    return replace(trial, signal=trial.signal - trial.signal.mean(axis=0), needs_average_reference=False,
                   baseline=trial.baseline - trial.baseline.mean(axis=0))


# DREAMER ----------------------------------------------------------------------------------------------------

def _cells(value):
    """The elements of a MATLAB cell array as loadmat(squeeze_me=True) gives it: it collapses a 1-element
    cell to the element itself."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return list(value.ravel())
    return [value]


def _field(struct, name, path, where):
    try:
        return struct[name] if isinstance(struct, dict) else getattr(struct, name)
    except (KeyError, AttributeError):
        raise EEGFormatError(f"{path}: {where} has no field '{name}'") from None


def _dreamer_samples(value, channels, path, where):
    samples = np.asarray(value)
    if samples.dtype == object or samples.ndim != 2 or samples.shape[1] != channels:
        raise EEGFormatError(f"{path}: {where} has shape {samples.shape}, expected samples x {channels} "
                             "(one column per EEG_Electrodes entry)")
    samples = samples.astype(np.float64)
    if not np.isfinite(samples).all():
        row = int(np.flatnonzero(~np.isfinite(samples).all(axis=1))[0])
        raise EEGFormatError(f"{path}: {where} has a non-finite (NaN or infinite) sample at row {row + 1}")
    return samples.T * MICROVOLT


def _score(value, low, high, path, where):
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise EEGFormatError(f"{path}: {where} = {value!r} is not a number") from None
    if not low <= score <= high:
        raise EEGFormatError(f"{path}: {where} = {score:g} is outside {low}..{high}")
    return score


def _sampling_rate(value, path, where):
    """A recording's rate in Hz, high enough that the features' band (up to 45 Hz, with its 2 Hz edge) lies below
    half of it."""
    lowest = 2 * (BROADBAND[1] + BROADBAND_TRANSITION_HZ)
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise EEGFormatError(f"{path}: {where} = {value!r} is not a number (expected a sampling rate in Hz)") from None
    if not lowest <= rate < np.inf:
        raise EEGFormatError(f"{path}: {where} = {rate:g} Hz; expected a finite rate of at least {lowest:g} Hz, so "
                             f"that the features' {BROADBAND[0]:g}-{BROADBAND[1]:g} Hz band lies below half of it")
    return rate


def iter_dreamer(path):
    """Yields the trials of a DREAMER.mat one by one; scores 1..5 map to [-1, 1] by (s - 3) / 2. The file is read
    whole (MATLAB's format allows no less), but each trial's samples in volts exist only while it is in use."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, TypeError, NotImplementedError, MatReadError, zlib.error) as error:
        raise EEGFormatError(f"{path}: not a readable MATLAB file ({error})") from error
    root = _field(mat, "DREAMER", path, "the file")
    sfreq = _sampling_rate(_field(root, "EEG_SamplingRate", path, "DREAMER"), path, "DREAMER.EEG_SamplingRate")
    electrodes = tuple(str(name) for name in _cells(_field(root, "EEG_Electrodes", path, "DREAMER")))
    if electrodes != DREAMER_ELECTRODES:
        raise EEGFormatError(f"{path}: DREAMER.EEG_Electrodes is {list(electrodes)}, expected "
                             f"{list(DREAMER_ELECTRODES)}")
    for s, subject in enumerate(_cells(_field(root, "Data", path, "DREAMER")), 1):
        where = f"DREAMER.Data{{{s}}}"
        eeg = _field(subject, "EEG", path, where)
        stimuli = _cells(_field(eeg, "stimuli", path, where + ".EEG"))
        baselines = _cells(_field(eeg, "baseline", path, where + ".EEG"))
        valence = np.atleast_1d(_field(subject, "ScoreValence", path, where))
        arousal = np.atleast_1d(_field(subject, "ScoreArousal", path, where))
        if not len(stimuli) == len(baselines) == len(valence) == len(arousal):
            raise EEGFormatError(f"{path}: {where} has {len(stimuli)} stimuli, {len(baselines)} baselines, "
                                 f"{len(valence)} valence and {len(arousal)} arousal scores; expected one each per "
                                 "clip")
        for t in range(len(stimuli)):
            clip = f"{{{t + 1}}}"
            yield Trial(
                dataset="DREAMER", subject=f"dreamer-{s:02d}", trial=t + 1, sfreq=sfreq, ch_names=electrodes,
                signal=_dreamer_samples(stimuli[t], len(electrodes), path, f"{where}.EEG.stimuli{clip}"),
                baseline=_dreamer_samples(baselines[t], len(electrodes), path, f"{where}.EEG.baseline{clip}"),
                valence=(_score(valence[t], 1, 5, path, f"{where}.ScoreValence({t + 1})") - 3) / 2,
                arousal=(_score(arousal[t], 1, 5, path, f"{where}.ScoreArousal({t + 1})") - 3) / 2,
                source=path)


def _cell_column(arrays):
    cells = np.empty((len(arrays), 1), dtype=object)
    for i, array in enumerate(arrays):
        cells[i, 0] = array
    return cells


def write_dreamer(path, subjects, sfreq=128, note="synthetic"):
    """Write DREAMER.mat. subjects: dicts with stimuli and baseline (lists of samples x 14 arrays, microvolts)
    and valence and arousal (lists of 1..5 scores), one entry per clip."""
    data = np.empty((1, len(subjects)), dtype=object)
    for i, subject in enumerate(subjects):
        clips = len(subject["stimuli"])
        data[0, i] = {
            "Age": 25, "Gender": "female",
            "EEG": {"stimuli": _cell_column(subject["stimuli"]), "baseline": _cell_column(subject["baseline"])},
            "ScoreValence": np.asarray(subject["valence"], dtype=np.float64).reshape(clips, 1),
            "ScoreArousal": np.asarray(subject["arousal"], dtype=np.float64).reshape(clips, 1),
            "ScoreDominance": np.full((clips, 1), 3.0),
        }
    electrodes = np.empty((1, len(DREAMER_ELECTRODES)), dtype=object)
    electrodes[0, :] = DREAMER_ELECTRODES
    content = {"DREAMER": {
        "Data": data, "EEG_SamplingRate": float(sfreq), "ECG_SamplingRate": 256.0, "EEG_Electrodes": electrodes,
        "noOfSubjects": float(len(subjects)), "noOfVideoSequences": float(len(subjects[0]["stimuli"])),
        "Disclaimer": note, "Provider": note, "Version": "1.0.2", "Acknowledgement": note}}
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            scipy.io.savemat(handle, content, do_compression=True, oned_as="column")


# MAHNOB-HCI -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MahnobSession:
    """A labelled MAHNOB-HCI session whose EEG is yet to be read (read_mahnob_trial reads it)."""
    dataset: ClassVar[str] = "MAHNOB-HCI"
    bdf: str
    subject: str
    trial: int
    valence: float  # [-1, 1]
    arousal: float  # [-1, 1]


@dataclass
class MahnobScan:
    sessions: list                      # MahnobSession, in session order
    skipped_without_felt_labels: list   # session folders
    skipped_without_eeg: list
    without_subject: list = field(default_factory=list)  # session.xml files that name no subject: unusable


def _natural_key(text):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def scan_mahnob(root):
    """The labelled sessions under root/Sessions/, from their session.xml (felt scores 1..9 map to [-1, 1] by
    (s - 5) / 4) and the name of their BDF; no EEG is read."""
    sessions_dir = os.path.join(root, "Sessions")
    if not os.path.isdir(sessions_dir):
        raise EEGFormatError(f"{root}: no Sessions/ folder; expected the MAHNOB-HCI tree Sessions/<id>/session.xml")
    scan = MahnobScan([], [], [])
    for session in sorted(os.listdir(sessions_dir), key=_natural_key):
        folder = os.path.join(sessions_dir, session)
        xml_path = os.path.join(folder, "session.xml")
        if not os.path.isfile(xml_path):
            continue
        try:
            session_xml = ElementTree.parse(xml_path).getroot()
        except (ElementTree.ParseError, LookupError, ValueError) as error:  # LookupError: an unknown encoding named
            raise EEGFormatError(f"{xml_path}: not well-formed XML ({error})") from error
        attributes = session_xml.attrib
        if "feltVlnc" not in attributes or "feltArsl" not in attributes:
            scan.skipped_without_felt_labels.append(folder)
            continue
        bdfs = sorted(glob.glob(os.path.join(folder, "*.bdf")))
        if not bdfs:
            scan.skipped_without_eeg.append(folder)
            continue
        subject_element = session_xml.find("subject")
        subject = (subject_element.get("id") or "").strip() if subject_element is not None else ""
        if not subject:  # taken for a person of its own, it could put one subject on both sides of the split
            scan.without_subject.append(f"{xml_path}: names no subject (<subject id=...>), so its trial cannot be "
                                        "kept to one side of the held-out split")
            continue
        trial_number = re.search(r"Trial(\d+)", os.path.basename(bdfs[0]))
        scan.sessions.append(MahnobSession(
            bdf=bdfs[0], subject=f"mahnob-{subject}", trial=int(trial_number.group(1)) if trial_number else 0,
            valence=(_score(attributes["feltVlnc"], 1, 9, xml_path, "feltVlnc") - 5) / 4,
            arousal=(_score(attributes["feltArsl"], 1, 9, xml_path, "feltArsl") - 5) / 4))
    return scan


def read_mahnob_trial(session):
    """The EEG of one session: its 32 EEG channels picked by name, the trial between the first two Status events and
    the 30 s before it as baseline, as stored (against CMS: see average_referenced)."""
    import mne  # imported here: reading DREAMER alone should not pay for it

    bdf = session.bdf
    try:
        raw = mne.io.read_raw_bdf(bdf, preload=False, verbose="error")
    except Exception as error:  # MNE raises several types for a damaged file
        raise EEGFormatError(f"{bdf}: unreadable BDF ({type(error).__name__}: {error})") from error
    missing = [name for name in MAHNOB_EEG if name not in raw.ch_names]
    if missing:
        raise EEGFormatError(f"{bdf}: lacks the EEG channels {missing}")
    if "Status" not in raw.ch_names:
        raise EEGFormatError(f"{bdf}: has no Status channel to mark the trial")
    # The low 16 bits of a BioSemi Status word carry the triggers; the high ones carry system state.
    events = mne.find_events(raw, stim_channel="Status", mask=0xFFFF, mask_type="and", shortest_event=1,
                             verbose="error")
    if len(events) < 2:
        raise EEGFormatError(f"{bdf}: {len(events)} Status events; the trial lies between the first two")
    sfreq = float(raw.info["sfreq"])
    start, stop = int(events[0, 0]), int(events[1, 0])
    baseline_start = start - int(round(MAHNOB_BASELINE_S * sfreq))
    if baseline_start < 0:
        raise EEGFormatError(f"{bdf}: the trial starts {start / sfreq:.1f} s into the recording; "
                             f"{MAHNOB_BASELINE_S:g} s of baseline before it are needed")
    signals = raw.get_data(picks=list(MAHNOB_EEG), start=baseline_start, stop=stop)
    if not np.isfinite(signals).all():
        raise EEGFormatError(f"{bdf}: non-finite EEG samples")
    split = start - baseline_start
    return Trial(dataset=session.dataset, subject=session.subject, trial=session.trial, sfreq=sfreq,
                 ch_names=MAHNOB_EEG, signal=signals[:, split:], baseline=signals[:, :split], valence=session.valence,
                 arousal=session.arousal, source=bdf, needs_average_reference=True)


def write_session_xml(path, session_id, subject_id, felt_valence=None, felt_arousal=None):
    """session.xml as MAHNOB-HCI has it; felt scores left out when None (as in its unlabelled sessions)."""
    attributes = {"sessionId": str(session_id), "isStim": "1"}
    if felt_valence is not None:
        attributes.update(feltVlnc=str(felt_valence), feltArsl=str(felt_arousal))
    root = ElementTree.Element("session", attributes)
    ElementTree.SubElement(root, "subject", {"id": str(subject_id)})
    with atomic_path(path) as temporary:
        ElementTree.ElementTree(root).write(temporary, encoding="utf-8", xml_declaration=True)


def write_bdf(path, ch_names, signals, sfreq, status):
    """A 24-bit BioSemi BDF with one-second records. signals: channels x samples in microvolts; status: the
    Status channel's integer trigger words (one per sample), appended as the last channel."""
    sfreq = int(sfreq)
    samples = signals.shape[1]
    records = -(-samples // sfreq)
    padded = np.zeros((len(ch_names) + 1, records * sfreq))
    padded[:-1, :samples] = signals
    padded[-1, :samples] = status
    labels = list(ch_names) + ["Status"]
    digital_min, digital_max = -(2 ** 23), 2 ** 23 - 1
    physical = [(-262144.0, 262143.0)] * len(ch_names) + [(float(digital_min), float(digital_max))]

    def text(value, width):
        return str(value).ljust(width)[:width].encode("ascii")

    count = len(labels)
    header = b"\xffBIOSEMI" + text("synthetic", 80) + text("synthetic", 80) + text("01.01.26", 8)
    header += text("00.00.00", 8) + text(256 * (count + 1), 8) + text("24BIT", 44) + text(records, 8)
    header += text(1, 8) + text(count, 4)
    header += b"".join(text(label, 16) for label in labels)
    header += b"".join(text("active electrode" if label != "Status" else "triggers and status", 80)
                       for label in labels)
    header += b"".join(text("uV" if label != "Status" else "Boolean", 8) for label in labels)
    header += b"".join(text(int(low), 8) for low, _ in physical)
    header += b"".join(text(int(high), 8) for _, high in physical)
    header += b"".join(text(digital_min, 8) for _ in labels) + b"".join(text(digital_max, 8) for _ in labels)
    header += b"".join(text("HP:DC; LP:417 Hz", 80) for _ in labels)
    header += b"".join(text(sfreq, 8) for _ in labels) + b"".join(text("", 32) for _ in labels)

    scale = np.array([(digital_max - digital_min) / (high - low) for low, high in physical])[:, None]
    offset = np.array([low for low, _ in physical])[:, None]
    digital = np.round((padded - offset) * scale + digital_min)
    digital = np.clip(digital, digital_min, digital_max).astype(np.int32)
    # record-major: each one-second record holds every channel's samples in turn, 3 bytes little-endian each
    ordered = digital.reshape(count, records, sfreq).transpose(1, 0, 2).reshape(-1)
    raw_bytes = ordered.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(header)
            handle.write(raw_bytes)
