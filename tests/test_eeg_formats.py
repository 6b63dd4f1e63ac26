"""DREAMER and MAHNOB-HCI readers on fixtures in the real structures, and their errors."""

import itertools
import os

import numpy as np
import pytest
import scipy.io

from helpers import read_only_session, write_mahnob_session
from ngd_ext.data.eeg import (DREAMER_ELECTRODES, MAHNOB_EEG, EEGFormatError, average_referenced, iter_dreamer,
                                 read_mahnob_trial, scan_mahnob, without_unusable_channels, write_dreamer)


def dreamer_subjects(rng, subjects=2, clips=2, seconds=3, sfreq=128):
    return [dict(stimuli=[rng.normal(4200, 20, (seconds * sfreq + clip, 14)) for clip in range(clips)],
                 baseline=[rng.normal(4200, 20, (2 * sfreq, 14)) for _ in range(clips)],
                 valence=[1 + (s + clip) % 5 for clip in range(clips)],
                 arousal=[5 - (s + clip) % 5 for clip in range(clips)]) for s in range(subjects)]


def test_read_dreamer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    subjects = dreamer_subjects(rng)
    path = str(tmp_path / "DREAMER.mat")
    write_dreamer(path, subjects)
    trials = list(iter_dreamer(path))
    assert [(t.subject, t.trial) for t in trials] == [("dreamer-01", 1), ("dreamer-01", 2), ("dreamer-02", 1),
                                                      ("dreamer-02", 2)]
    first = trials[1]
    assert first.sfreq == 128 and first.ch_names == DREAMER_ELECTRODES
    np.testing.assert_allclose(first.signal, subjects[0]["stimuli"][1].T * 1e-6)
    np.testing.assert_allclose(first.baseline, subjects[0]["baseline"][1].T * 1e-6)
    assert (first.valence, first.arousal) == ((2 - 3) / 2, (4 - 3) / 2)


def test_read_dreamer_single_subject_single_clip(tmp_path):
    # squeeze_me collapses 1-element cells; the reader must not iterate over the samples instead.
    path = str(tmp_path / "DREAMER.mat")
    write_dreamer(path, dreamer_subjects(np.random.default_rng(1), subjects=1, clips=1))
    trials = list(iter_dreamer(path))
    assert len(trials) == 1 and trials[0].signal.shape == (14, 3 * 128)


def test_iter_dreamer_gives_each_trial_before_reading_the_next(tmp_path):
    # One trial's samples at a time: a broken later clip is reached only after the earlier ones were given.
    subjects = dreamer_subjects(np.random.default_rng(4))
    subjects[1]["stimuli"][1] = subjects[1]["stimuli"][1][:, :13]
    path = str(tmp_path / "DREAMER.mat")
    write_dreamer(path, subjects)
    trials = iter_dreamer(path)
    assert [(t.subject, t.trial) for t in itertools.islice(trials, 3)] == [
        ("dreamer-01", 1), ("dreamer-01", 2), ("dreamer-02", 1)]
    with pytest.raises(EEGFormatError, match=r"DREAMER.Data\{2\}.EEG.stimuli\{2\} has shape"):
        next(trials)


def rewrite_without(path, drop_field):
    """Rewrite DREAMER.mat without DREAMER.<field>, or without the second subject's EEG.<field>."""
    root = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=False)["DREAMER"][0, 0]
    content = {name: getattr(root, name) for name in root._fieldnames}
    if drop_field in content:
        del content[drop_field]
    else:
        subject = content["Data"][0, 1][0, 0]
        eeg = subject.EEG[0, 0]
        content["Data"][0, 1] = {name: getattr(subject, name) for name in subject._fieldnames}
        content["Data"][0, 1]["EEG"] = {name: getattr(eeg, name) for name in eeg._fieldnames if name != drop_field}
    scipy.io.savemat(path, {"DREAMER": content})


@pytest.mark.parametrize("drop_field,message", [
    ("EEG_Electrodes", r"DREAMER.mat: DREAMER has no field 'EEG_Electrodes'"),
    ("stimuli", r"DREAMER.mat: DREAMER.Data\{2\}.EEG has no field 'stimuli'"),
])
def test_read_dreamer_missing_field(tmp_path, drop_field, message):
    path = str(tmp_path / "DREAMER.mat")
    write_dreamer(path, dreamer_subjects(np.random.default_rng(2)))
    rewrite_without(path, drop_field)
    with pytest.raises(EEGFormatError, match=message):
        list(iter_dreamer(path))


@pytest.mark.parametrize("rate, message", [
    (0.0, r"DREAMER.EEG_SamplingRate = 0 Hz; expected a finite rate of at least 94 Hz, so that the features' 4-45 Hz "
          r"band lies below half of it"),
    ("fast", r"DREAMER.EEG_SamplingRate = 'fast' is not a number \(expected a sampling rate in Hz\)"),
    (np.inf, r"DREAMER.EEG_SamplingRate = inf Hz; expected a finite rate"),
])
def test_read_dreamer_sampling_rate_that_cannot_be_one(tmp_path, rate, message):
    path = str(tmp_path / "DREAMER.mat")
    write_dreamer(path, dreamer_subjects(np.random.default_rng(2)))
    root = scipy.io.loadmat(path, struct_as_record=False, squeeze_me=False)["DREAMER"][0, 0]
    content = {name: getattr(root, name) for name in root._fieldnames}
    scipy.io.savemat(path, {"DREAMER": {**content, "EEG_SamplingRate": rate}})
    with pytest.raises(EEGFormatError, match=rf"DREAMER.mat: {message}"):
        list(iter_dreamer(path))


def test_read_dreamer_wrong_channel_count_and_nan(tmp_path):
    rng = np.random.default_rng(3)
    path = str(tmp_path / "DREAMER.mat")
    subjects = dreamer_subjects(rng)
    subjects[1]["stimuli"][0] = subjects[1]["stimuli"][0][:, :13]
    write_dreamer(path, subjects)
    with pytest.raises(EEGFormatError, match=r"DREAMER.mat: DREAMER.Data\{2\}.EEG.stimuli\{1\} has shape "
                                             r"\(384, 13\), expected samples x 14"):
        list(iter_dreamer(path))
    subjects = dreamer_subjects(rng)
    subjects[0]["baseline"][1][10, 3] = np.nan
    write_dreamer(path, subjects)
    with pytest.raises(EEGFormatError, match=r"DREAMER.Data\{1\}.EEG.baseline\{2\} has a non-finite .* row 11"):
        list(iter_dreamer(path))


def test_read_dreamer_score_out_of_range_and_unreadable_file(tmp_path):
    path = str(tmp_path / "DREAMER.mat")
    subjects = dreamer_subjects(np.random.default_rng(4))
    subjects[0]["arousal"][1] = 7
    write_dreamer(path, subjects)
    with pytest.raises(EEGFormatError, match=r"DREAMER.Data\{1\}.ScoreArousal\(2\) = 7 is outside 1..5"):
        list(iter_dreamer(path))
    with open(path, "r+b") as handle:  # one byte of a compressed variable changed: its checksum fails
        handle.seek(int(0.9 * os.path.getsize(path)))
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EEGFormatError, match=r"DREAMER.mat: not a readable MATLAB file \(Error -3 while decompressing"):
        list(iter_dreamer(path))
    with open(path, "wb") as handle:
        handle.write(b"garbage")
    with pytest.raises(EEGFormatError, match=r"DREAMER.mat: not a readable MATLAB file"):
        list(iter_dreamer(path))


def test_read_mahnob_picks_channels_by_name_and_cuts_the_trial(tmp_path):
    root = str(tmp_path)
    order = list(reversed(MAHNOB_EEG))  # out of order on disk
    names, signals, start, stop = write_mahnob_session(root, 2, 1, felt=(9, 1), order=order)
    write_mahnob_session(root, 10, 2, felt=(5, 6))
    write_mahnob_session(root, 3, 1, felt=None)  # no felt labels: skipped and counted
    scan = scan_mahnob(root)
    assert [(s.subject, s.trial, s.valence, s.arousal) for s in scan.sessions] == [
        ("mahnob-1", 2, 1.0, -1.0), ("mahnob-2", 10, 0.0, 0.25)]
    assert [os.path.basename(p) for p in scan.skipped_without_felt_labels] == ["3"]
    trial = read_mahnob_trial(scan.sessions[0])
    assert (trial.subject, trial.trial, trial.source) == ("mahnob-1", 2, scan.sessions[0].bdf)
    assert trial.sfreq == 256 and trial.ch_names == MAHNOB_EEG
    assert (trial.valence, trial.arousal) == (1.0, -1.0)
    assert trial.signal.shape == (32, stop - start) and trial.baseline.shape == (32, 30 * 256)
    fz = names.index("Fz")
    # 24-bit quantisation over +-262144 uV is 1/32 uV
    np.testing.assert_allclose(trial.signal[MAHNOB_EEG.index("Fz")], signals[fz, start:stop] * 1e-6, atol=2e-8)
    np.testing.assert_allclose(trial.baseline[MAHNOB_EEG.index("Fz"), -1], signals[fz, start - 1] * 1e-6, atol=2e-8)


def test_read_mahnob_errors_name_the_file(tmp_path):
    root = str(tmp_path / "missing_channel")
    write_mahnob_session(root, 1, 1, drop=("Oz",))
    with pytest.raises(EEGFormatError, match=r"Part_1_S_Trial1_emotion.bdf: lacks the EEG channels \['Oz'\]"):
        read_only_session(root)
    root = str(tmp_path / "one_event")
    write_mahnob_session(root, 1, 1, events=1)
    with pytest.raises(EEGFormatError, match=r"emotion.bdf: 1 Status events; the trial lies between the first two"):
        read_only_session(root)
    root = str(tmp_path / "short_baseline")
    write_mahnob_session(root, 1, 1, baseline=10)
    with pytest.raises(EEGFormatError, match=r"starts 10.0 s into the recording; 30 s of baseline"):
        read_only_session(root)
    root = str(tmp_path / "unreadable")
    write_mahnob_session(root, 1, 1)
    bdf = os.path.join(root, "Sessions", "1", "Part_1_S_Trial1_emotion.bdf")
    with open(bdf, "r+b") as handle:
        handle.truncate(300)
    with pytest.raises(EEGFormatError, match=r"Part_1_S_Trial1_emotion.bdf: unreadable BDF"):
        read_only_session(root)
    root = str(tmp_path / "felt_out_of_range")
    write_mahnob_session(root, 1, 1, felt=(10, 5))
    with pytest.raises(EEGFormatError, match=r"Sessions/1/session.xml: feltVlnc = 10 is outside 1..9"):
        scan_mahnob(root)
    root = str(tmp_path / "felt_not_a_number")
    write_mahnob_session(root, 1, 1, felt=("high", 5))
    with pytest.raises(EEGFormatError, match=r"Sessions/1/session.xml: feltVlnc = 'high' is not a number"):
        scan_mahnob(root)
    with pytest.raises(EEGFormatError, match=r"no Sessions/ folder"):
        scan_mahnob(str(tmp_path / "nothing"))


def test_constant_channels_are_left_out_up_to_a_quarter(tmp_path):
    root = str(tmp_path / "T7")
    write_mahnob_session(root, 1, 1, constant=("T7",))
    trial = read_only_session(root)
    kept, constant, noisy = without_unusable_channels(trial)
    assert noisy == ()
    t7 = MAHNOB_EEG.index("T7")
    assert constant == ("T7",) and kept.ch_names == MAHNOB_EEG[:t7] + MAHNOB_EEG[t7 + 1:]
    np.testing.assert_array_equal(kept.signal, np.delete(trial.signal, t7, axis=0))
    np.testing.assert_array_equal(kept.baseline, np.delete(trial.baseline, t7, axis=0))
    assert (kept.subject, kept.trial, kept.valence, kept.source) == (trial.subject, trial.trial, trial.valence,
                                                                     trial.source)
    assert without_unusable_channels(kept)[0] is kept
    root = str(tmp_path / "eight")
    write_mahnob_session(root, 1, 1, constant=MAHNOB_EEG[:8])  # a quarter of 32
    assert without_unusable_channels(read_only_session(root))[1] == MAHNOB_EEG[:8]
    root = str(tmp_path / "nine")
    write_mahnob_session(root, 1, 1, constant=MAHNOB_EEG[:9])
    with pytest.raises(EEGFormatError, match=r"Part_1_S_Trial1_emotion.bdf: mahnob-1 trial 1 has 9 of its 32 channels "
                                             r"unusable in its stimulus or baseline \(constant: Fp1, AF3, F3, F7, FC5, "
                                             r"FC1, C3, T7, CP5\): more than 25% would be left out"):
        without_unusable_channels(read_only_session(root))
    # a channel constant in its baseline alone, as DREAMER stores it (samples x channels, microvolts)
    subjects = dreamer_subjects(np.random.default_rng(5), subjects=1)
    subjects[0]["baseline"][0][:, DREAMER_ELECTRODES.index("FC5")] = 4200.0
    path = str(tmp_path / "DREAMER.mat")
    write_dreamer(path, subjects)
    first, second = iter_dreamer(path)
    kept, constant, _ = without_unusable_channels(first)
    assert constant == ("FC5",) and len(kept.ch_names) == 13 and kept.signal.shape == (13, 3 * 128)
    assert without_unusable_channels(second)[1] == ()


def test_noisy_channels_are_left_out_with_the_constant_ones_up_to_a_quarter(tmp_path):
    """Amplitude over 10x the median channel's, in the stimulus or the baseline, is noisy, whatever all channels
    share; 5x, a second of 100x (a burst), 1/50x and a channel that stores little against the reference beside it
    are not."""
    sfreq, baseline = 256, 31
    samples = (baseline + 4 + 2) * sfreq
    burst = np.zeros(samples)
    burst[10 * sfreq:11 * sfreq] = 100 * np.random.default_rng(9).normal(0, 30, sfreq)
    root = str(tmp_path / "four")
    write_mahnob_session(root, 1, 1, constant=("Pz",), gains={"O1": 20.0, "Cz": 0.02, "T8": 5.0, "P8": 0.2},
                         extra={"Fp1": burst})
    # a channel noisy in its stimulus alone: 20x from the trial's onset on
    stimulus_only = np.where(np.arange(samples) >= baseline * sfreq, 20.0, 1.0)
    write_mahnob_session(str(tmp_path / "stimulus"), 1, 1, gains={"F4": stimulus_only})
    trial = read_only_session(root)
    kept, constant, noisy = without_unusable_channels(trial)
    assert constant == ("Pz",) and noisy == ("O1",)
    assert kept.ch_names == tuple(name for name in MAHNOB_EEG if name not in ("Pz", "O1"))
    assert without_unusable_channels(read_only_session(str(tmp_path / "stimulus")))[2] == ("F4",)
    # Pz beside the reference electrode: it stores little against it (0.3 uV), the others 42 uV, yet it records EEG
    cms = np.random.default_rng(10).normal(0, 30, samples)
    write_mahnob_session(str(tmp_path / "beside"), 1, 1, gains={"Pz": 0.01}, extra={"Pz": cms}, common=-cms)
    assert without_unusable_channels(read_only_session(str(tmp_path / "beside")))[2] == ()
    # a hum every channel shares (300 uV at 10 Hz, stored against CMS) does not hide O1's 20x
    hum = 300 * np.sin(2 * np.pi * 10 * np.arange(samples) / sfreq)
    write_mahnob_session(str(tmp_path / "hum"), 1, 1, gains={"O1": 20.0}, common=hum)
    assert without_unusable_channels(read_only_session(str(tmp_path / "hum")))[2] == ("O1",)
    assert without_unusable_channels(trial, noisy_ratio=25.0)[2] == ()
    assert without_unusable_channels(trial, noisy_ratio=0)[1:] == (("Pz",), ())

    root = str(tmp_path / "nine")
    write_mahnob_session(root, 1, 1, constant=MAHNOB_EEG[:6], gains={"O1": 30.0, "Oz": 30.0, "O2": 30.0})
    with pytest.raises(EEGFormatError, match=r"has 9 of its 32 channels unusable in its stimulus or baseline "
                                             r"\(constant: Fp1, AF3, F3, F7, FC5, FC1; noisy, over 10x the median "
                                             r"channel's amplitude: O1, Oz, O2\): more than 25% would be left out$"):
        without_unusable_channels(read_only_session(root))


def test_average_reference_takes_out_what_every_biosemi_channel_shares(tmp_path):
    """BioSemi stores each channel against CMS, so all of them carry the same interference, in the EEG's bands too
    (here a 10 Hz hum, a slow drift and mains); average-referenced, the trial is the same as without it. DREAMER's
    trials stay as recorded."""
    sfreq, samples = 256, (31 + 4 + 2) * 256
    seconds = np.arange(samples) / sfreq
    common = (50 * np.sin(2 * np.pi * 10 * seconds) + 300 * np.sin(2 * np.pi * 0.05 * seconds)
              + 40 * np.sin(2 * np.pi * 50 * seconds))  # microvolts
    trials = []
    for name, shared in (("clean", 0.0), ("interfered", common)):
        write_mahnob_session(str(tmp_path / name), 1, 1, common=shared)
        trial = read_only_session(str(tmp_path / name))
        assert trial.needs_average_reference
        trials.append(average_referenced(trial))
    clean, interfered = trials
    assert not clean.needs_average_reference and average_referenced(clean) is clean
    for field in ("signal", "baseline"):
        np.testing.assert_allclose(getattr(clean, field).mean(axis=0), 0.0, atol=1e-15)
        # 24-bit quantisation: 1/32 uV on each channel and on their mean
        np.testing.assert_allclose(getattr(interfered, field), getattr(clean, field), rtol=0, atol=7e-8)

    write_mahnob_session(str(tmp_path / "T7"), 1, 1, constant=("T7",), common=common)
    kept, constant, _ = without_unusable_channels(read_only_session(str(tmp_path / "T7")))
    referenced = average_referenced(kept)
    assert constant == ("T7",) and referenced.ch_names == kept.ch_names and len(kept.ch_names) == 31
    np.testing.assert_allclose(referenced.signal, kept.signal - kept.signal.mean(axis=0), rtol=0, atol=1e-15)

    path = str(tmp_path / "DREAMER.mat")
    write_dreamer(path, dreamer_subjects(np.random.default_rng(6), subjects=1, clips=1))
    (dreamer,) = iter_dreamer(path)
    assert not dreamer.needs_average_reference and average_referenced(dreamer) is dreamer
