"""Stage 1: features, the subject split, the synthetic default, and stage 1 then stage 2 end to end."""

import collections
import glob
import itertools
import json
import os
import re
import shutil
from functools import partial

import numpy as np
import pytest
import torch

import stage1_teacher
import stage2_prototypes
from helpers import write_mahnob_session
from ngd_ext import artifacts
from ngd_ext.data import eeg_cache
from ngd_ext.data.eeg_features import (BANDS, band_entropy, differential_entropy, interpolation_matrix, preprocess,
                                  topographic_maps, windows)
from ngd_ext.data.eeg import (DREAMER_ELECTRODES, MAHNOB_EEG, NOISY_AMPLITUDE_RATIO, EEGFormatError, MahnobSession,
                                 Trial, iter_dreamer, read_mahnob_trial, scan_mahnob, without_unusable_channels,
                                 write_dreamer)
from ngd_ext.runtime import map_in_processes
from ngd_ext.data.synthetic_eeg import ensure_synthetic_eeg, write_synthetic_dreamer
from ngd_ext.teacher_embeddings import load_embeddings

TINY = stage1_teacher.SYNTHETIC_SIZES["tiny"]


def test_differential_entropy_of_gaussian_noise():
    rng = np.random.default_rng(0)
    segments = rng.normal(0, 3.0, (2, 5, 20000))
    np.testing.assert_allclose(differential_entropy(segments), 0.5 * np.log(2 * np.pi * np.e * 9.0), rtol=5e-3)


def test_windows_count_and_content():
    signal = np.arange(2 * 10, dtype=float).reshape(2, 10)
    cut = windows(signal, sfreq=2, window_s=2.0, step_s=1.5)  # 4 samples, step 3
    assert cut.shape == (3, 2, 4)
    np.testing.assert_array_equal(cut[1, 1], [13, 14, 15, 16])


@pytest.mark.parametrize("names", [DREAMER_ELECTRODES, MAHNOB_EEG], ids=["DREAMER", "MAHNOB"])
def test_interpolation_matrix(names):
    matrix = interpolation_matrix(names, 16)
    inside = matrix.sum(axis=1) > 0
    np.testing.assert_allclose(matrix[inside].sum(axis=1), 1.0)
    assert 150 < inside.sum() < 256  # a disc in the square
    features = np.full((3, 4, len(names)), 2.5)
    maps = topographic_maps(features, matrix, 16)
    assert maps.shape == (3, 4, 16, 16)
    np.testing.assert_allclose(maps.reshape(3, 4, -1)[:, :, inside], 2.5)
    # the pixel nearest an electrode takes most of its weight from that electrode: F3 is front left
    f3 = names.index("F3")
    top_pixel = matrix[:, f3].argmax()
    row, column = divmod(top_pixel, 16)
    assert row < 8 and column < 8 and matrix[top_pixel, f3] > 0.5


def test_band_pass_keeps_the_bands_and_stops_mains():
    """4-45 Hz with 2 Hz edges: 50 Hz mains, which MNE's automatic upper edge would pass at -5 dB into the gamma band,
    is stopped below -60 dB, and 60 Hz with it."""
    sfreq = 256
    seconds = np.arange(40 * sfreq) / sfreq
    kept = {}
    for frequency in (5.0, 44.0, 50.0, 60.0):
        tone = np.sin(2 * np.pi * frequency * seconds)[None]
        signal, baseline = preprocess(tone[:, 20 * sfreq:], tone[:, :20 * sfreq], sfreq, 128)
        kept[frequency] = signal[:, 5 * 128:-5 * 128].std() / tone.std()  # away from the recording's ends
    assert 0.97 < kept[5.0] < 1.01 and 0.97 < kept[44.0] < 1.01
    assert kept[50.0] < 1e-3 and kept[60.0] < 1e-3


def test_mahnob_features_are_average_referenced_over_the_channels_that_recorded(tmp_path):
    """A constant channel and a noisy one are found as stored and left out; the others are then average-referenced,
    so that what every channel carries against CMS (a 10 Hz hum, inside the alpha band) leaves the features as they
    are."""
    hum = 50 * np.sin(2 * np.pi * 10 * np.arange((31 + 4 + 2) * 256) / 256)  # microvolts
    features = features_cached_in(tmp_path / "cache")
    trials = []
    for name, common in (("clean", 0.0), ("hum", hum)):
        write_mahnob_session(str(tmp_path / name), 1, 1, constant=("T7",), gains={"O1": 40.0}, common=common)
        (session,) = scan_mahnob(str(tmp_path / name)).sessions
        trials.append(features(session))
    clean, hummed = trials
    assert (hummed.constant_channels, hummed.noisy_channels) == (("T7",), ("O1",))
    assert hummed.ch_names == tuple(name for name in MAHNOB_EEG if name not in ("T7", "O1"))
    assert hummed.entropy.shape == clean.entropy.shape == (3, len(BANDS), 30)
    np.testing.assert_allclose(hummed.entropy, clean.entropy, rtol=0, atol=5e-3)


def test_split_holds_out_whole_subjects_of_each_dataset():
    subjects = {"DREAMER": {f"dreamer-{i:02d}" for i in range(1, 13)},
                "MAHNOB-HCI": {f"mahnob-{i}" for i in range(1, 9)}}
    held_out = stage1_teacher.split_subjects(subjects, 0.25, seed=3)
    assert len(held_out & subjects["DREAMER"]) == 3 and len(held_out & subjects["MAHNOB-HCI"]) == 2
    assert held_out == stage1_teacher.split_subjects(subjects, 0.25, seed=3)
    assert stage1_teacher.split_subjects({"DREAMER": {"a"}, "MAHNOB-HCI": {"b", "c"}}, 0.9, 0) in ({"b"}, {"c"})


def tiny_trial_sources(tmp_path):
    dreamer, mahnob = ensure_synthetic_eeg(str(tmp_path / "eeg"), seed=5, **TINY)
    return lambda: itertools.chain(iter_dreamer(dreamer), scan_mahnob(mahnob).sessions)


def features_cached_in(cache_dir, window_s=2.0, step_s=1.0, noisy_ratio=NOISY_AMPLITUDE_RATIO):
    return partial(eeg_cache.trial_entropy, window_s=window_s, step_s=step_s, noisy_ratio=noisy_ratio,
                   cache_dir=str(cache_dir))


def test_no_window_of_a_held_out_trial_is_trained_on(tmp_path):
    features = features_cached_in(tmp_path / "cache")
    trials = [features(source) for source in tiny_trial_sources(tmp_path)()]
    subjects = {}
    for trial in trials:
        subjects.setdefault(trial.dataset, set()).add(trial.subject)
    held_out = stage1_teacher.split_subjects(subjects, 0.25, seed=5)
    matrices = {names: interpolation_matrix(names, 16) for names in {t.ch_names for t in trials}}
    train = stage1_teacher.window_data([t for t in trials if t.subject not in held_out], matrices, 16)
    test = stage1_teacher.window_data([t for t in trials if t.subject in held_out], matrices, 16)
    assert len(train[0]) == len(train[4]) and len(test[0]) == len(test[4])
    assert len(train[0]) + len(test[0]) == sum(len(t.entropy) for t in trials)
    assert not set(train[4]) & set(test[4])  # trial ids
    assert set(test[3]) == held_out
    assert list(test[5]) == ["DREAMER" if s.startswith("dreamer-") else "MAHNOB-HCI" for s in test[3]]


def test_features_in_worker_processes_equal_those_in_this_one(tmp_path):
    sources = tiny_trial_sources(tmp_path)
    here = list(map_in_processes(features_cached_in(tmp_path / "here"), sources(), workers=1))
    there = list(map_in_processes(features_cached_in(tmp_path / "there"), sources(), workers=2))
    assert not any(t.from_cache for t in here + there)
    assert [t.trial_id for t in there] == [t.trial_id for t in here] and len(here) == 3 * 3 + 2 * 2 - 1
    for one, other in zip(here, there):
        np.testing.assert_array_equal(other.entropy, one.entropy)
        assert (other.valence, other.arousal, other.ch_names) == (one.valence, one.arousal, one.ch_names)


def test_an_error_in_a_worker_process_names_the_file(tmp_path):
    sessions = [source for source in tiny_trial_sources(tmp_path)() if isinstance(source, MahnobSession)]
    with open(sessions[1].bdf, "r+b") as handle:
        handle.truncate(300)
    with pytest.raises(EEGFormatError, match=rf"{re.escape(sessions[1].bdf)}: unreadable BDF"):
        list(map_in_processes(features_cached_in(tmp_path / "cache"), sessions, workers=2))


def test_unusable_recordings_are_left_out_and_listed_with_skip_unreadable(tmp_path, capsys):
    dreamer, mahnob = ensure_synthetic_eeg(str(tmp_path / "eeg"), seed=5, **TINY)
    damaged = sorted(glob.glob(os.path.join(mahnob, "Sessions", "*", "*.bdf")))[1]
    with open(damaged, "r+b") as handle:
        handle.truncate(300)
    arguments = ["--run-dir", str(tmp_path), "--dreamer", dreamer, "--mahnob", mahnob, "--epochs", "1",
                 "--workers", "1", "--device", "cpu"]
    with pytest.raises(EEGFormatError, match=rf"{re.escape(damaged)}: unreadable BDF"):
        stage1_teacher.main(arguments)
    stage1_teacher.main([*arguments, "--skip-unreadable"])
    out, err = capsys.readouterr()
    assert "features of 11 trials" in out and "; 1 left out, their recordings unusable" in out
    assert f"skipped (--skip-unreadable): {damaged}: unreadable BDF" in err
    with open(tmp_path / "stage1" / "metrics.json") as handle:
        (reason,) = json.load(handle)["skipped_trials"]
    assert reason.startswith(f"{damaged}: unreadable BDF")
    with open(tmp_path / "stage1" / "config.json") as handle:
        assert os.path.relpath(damaged, mahnob) not in json.load(handle)["inputs"]["mahnob"]["bdf_sha256"]


def test_a_mahnob_session_that_names_no_subject_stops_the_run_or_is_left_out(tmp_path, capsys):
    """Taken for a person of its own, such a session could put one subject's trials on both sides of the split."""
    dreamer, mahnob = ensure_synthetic_eeg(str(tmp_path / "eeg"), seed=5, **TINY)
    xml_path = sorted(glob.glob(os.path.join(mahnob, "Sessions", "*", "session.xml")))[2]
    with open(xml_path) as handle:
        text = handle.read()
    with open(xml_path, "w") as handle:
        handle.write(re.sub(r"<subject [^>]*/>", "", text))
    arguments = ["--run-dir", str(tmp_path), "--dreamer", dreamer, "--mahnob", mahnob, "--epochs", "1",
                 "--workers", "1", "--device", "cpu"]
    reason = (f"{xml_path}: names no subject (<subject id=...>), so its trial cannot be kept to one side of the "
              "held-out split")
    with pytest.raises(EEGFormatError, match=rf"^{re.escape(reason)} \(1 such session\(s\) in all; "
                                             r"--skip-unreadable leaves them out, and lists them\)$"):
        stage1_teacher.main(arguments)
    assert not os.path.exists(tmp_path / "stage1")
    stage1_teacher.main([*arguments, "--skip-unreadable"])
    out, err = capsys.readouterr()
    assert "MAHNOB-HCI: 2 labelled sessions" in out and f"skipped (--skip-unreadable): {reason}" in err
    with open(tmp_path / "stage1" / "metrics.json") as handle:
        assert json.load(handle)["skipped_trials"] == [reason]


def test_unusable_channels_are_left_out_of_their_trial_and_listed(tmp_path, capsys):
    """A channel constant, or noisy, in one clip is left out of that clip alone, whose maps interpolate the other 13
    over its place; a clip with more than a quarter of its channels constant is refused, or left out with
    --skip-unreadable."""
    rng = np.random.default_rng(8)
    subjects = [dict(stimuli=[rng.normal(4200, 20, (4 * 128, 14)) for _ in range(2)],
                     baseline=[rng.normal(4200, 20, (2 * 128, 14)) for _ in range(2)],
                     valence=[1 + s, 5 - s], arousal=[2, 4]) for s in range(4)]
    subjects[0]["baseline"][1][:, DREAMER_ELECTRODES.index("T7")] = 4200.0
    subjects[2]["stimuli"][0][:, :4] = 4100.0  # AF3, F7, F3 and FC5: 4 of 14
    subjects[1]["stimuli"][0][:, DREAMER_ELECTRODES.index("F8")] = rng.normal(4200, 400, 4 * 128)  # 20x
    dreamer = str(tmp_path / "DREAMER.mat")
    write_dreamer(dreamer, subjects)
    arguments = ["--run-dir", str(tmp_path), "--dreamer", dreamer, "--epochs", "1", "--workers", "1", "--device",
                 "cpu"]
    with pytest.raises(EEGFormatError, match=rf"^{re.escape(dreamer)}: dreamer-03 trial 1 has 4 of its 14 channels "
                                             r"unusable in its stimulus or baseline \(constant: AF3, F7, F3, FC5\): "
                                             r"more than 25% would be left out \(--skip-unreadable leaves out, and "
                                             r"lists, each trial that cannot be used\)$"):
        stage1_teacher.main(arguments)
    stage1_teacher.main([*arguments, "--skip-unreadable"])
    out, err = capsys.readouterr()
    assert "features of 7 trials, 4 of them from" in out  # the clips before the refused one, cached by the first run
    assert ("; 1 left out, their recordings unusable; 1 with constant channels left out; 1 with noisy channels left "
            "out") in out
    for trial, kind, name in (("dreamer-01/2", "constant", "T7"), ("dreamer-02/1", "noisy", "F8")):
        assert (f"{dreamer}: {trial}: {kind} channels left out, their places on the maps interpolated from the "
                f"other channels: {name}") in err
    with open(tmp_path / "stage1" / "metrics.json") as handle:
        metrics = json.load(handle)
    assert metrics["constant_channels"] == {"dreamer-01/2": ["T7"]} and len(metrics["skipped_trials"]) == 1
    assert metrics["noisy_channels"] == {"dreamer-02/1": ["F8"]}
    assert metrics["windows"]["train"] + metrics["windows"]["held_out"] == 7 * 3  # 4 s clips, 2 s windows every 1 s
    features = features_cached_in(tmp_path / "cache" / "eeg_features")
    clip = features(list(iter_dreamer(dreamer))[1])  # as the run cached it
    assert clip.from_cache and clip.constant_channels == ("T7",) and clip.entropy.shape == (3, len(BANDS), 13)
    assert clip.ch_names == tuple(name for name in DREAMER_ELECTRODES if name != "T7")


def test_features_are_cached_by_the_recordings_content(tmp_path, monkeypatch):
    sources, cache = tiny_trial_sources(tmp_path), tmp_path / "cache"
    features = features_cached_in(cache)
    first = [features(source) for source in sources()]
    assert len(os.listdir(cache)) == len(first) == 12 and not any(t.from_cache for t in first)

    def no_reading(*args):
        raise AssertionError("read or filtered again")

    with monkeypatch.context() as patched:
        patched.setattr(eeg_cache, "read_mahnob_trial", no_reading)
        patched.setattr(eeg_cache, "recording_entropy", no_reading)
        again = [features(source) for source in sources()]
    assert all(t.from_cache for t in again)
    for one, other in zip(first, again):
        np.testing.assert_array_equal(other.entropy, one.entropy)
        for field in ("trial_id", "ch_names", "content_sha256"):
            assert getattr(other, field) == getattr(one, field), field

    # Another recording under a session's name takes that recording's features, labelled as the session.
    sessions = [source for source in sources() if isinstance(source, MahnobSession)]
    shutil.copyfile(sessions[1].bdf, sessions[0].bdf)
    swapped = features(sessions[0])
    assert swapped.from_cache and swapped.trial_id == first[9].trial_id and swapped.valence == sessions[0].valence
    np.testing.assert_array_equal(swapped.entropy, first[10].entropy)

    # Other settings are other features; a damaged entry is taken anew and rewritten.
    assert not features_cached_in(cache, step_s=0.5)(sessions[1]).from_cache
    dreamer_entry = sorted(cache.glob("DREAMER-*.npz"))[0]
    dreamer_entry.write_bytes(b"not an npz")
    retaken = [features(source) for source in sources()]
    assert sum(not t.from_cache for t in retaken) == 1
    assert [t.entropy.tobytes() for t in retaken[:9]] == [t.entropy.tobytes() for t in first[:9]]
    assert eeg_cache.read_cached_entropy(str(dreamer_entry)) is not None


def test_synthetic_default_is_deterministic(tmp_path):
    first = ensure_synthetic_eeg(str(tmp_path / "a"), seed=7, **TINY)
    second = ensure_synthetic_eeg(str(tmp_path / "b"), seed=7, **TINY)
    for one, other in zip(iter_dreamer(first[0]), iter_dreamer(second[0])):  # a .mat header holds a timestamp
        np.testing.assert_array_equal(one.signal, other.signal)
        assert (one.valence, one.arousal) == (other.valence, other.arousal)
    bdf = os.path.join("Sessions", "1", "Part_1_S_Trial1_emotion.bdf")
    assert artifacts.sha256_file(os.path.join(first[1], bdf)) == artifacts.sha256_file(os.path.join(second[1], bdf))
    scan = scan_mahnob(first[1])
    assert len(scan.sessions) == 3 and len(scan.skipped_without_felt_labels) == 1


def test_synthetic_eeg_has_no_unusable_channel(tmp_path):
    """Its channels' gains, subjects' asymmetries and trials' band powers keep every channel within 2x of the median
    channel's amplitude (at most 1.74x over the demo's trials), far inside the noisy ratio of 10."""
    sources = tiny_trial_sources(tmp_path)()
    trials = [source if isinstance(source, Trial) else read_mahnob_trial(source) for source in sources]
    assert len(trials) == 12
    for trial in trials:
        assert without_unusable_channels(trial)[1:] == ((), ()), trial.source
        assert without_unusable_channels(trial, noisy_ratio=2.0)[2] == (), trial.source


def test_synthetic_eeg_carries_its_valence_and_arousal_correlates(tmp_path):
    path = str(tmp_path / "DREAMER.mat")
    write_synthetic_dreamer(path, seed=11, subjects=4, clips=8, seconds=8)
    asymmetry, fast_power, valence, arousal = [], [], [], []
    left = [DREAMER_ELECTRODES.index(name) for name in ("AF3", "F3", "F7", "FC5")]
    right = [DREAMER_ELECTRODES.index(name) for name in ("AF4", "F4", "F8", "FC6")]
    for trial in iter_dreamer(path):
        signal, baseline = preprocess(trial.signal, trial.baseline, trial.sfreq, 128)
        entropy = band_entropy(signal, baseline, 128, 2.0, 1.0).mean(axis=0)  # bands x channels
        asymmetry.append(entropy[1, right].mean() - entropy[1, left].mean())  # alpha: right minus left
        fast_power.append(entropy[2:].mean())  # beta and gamma
        valence.append(trial.valence)
        arousal.append(trial.arousal)
    assert np.corrcoef(asymmetry, valence)[0, 1] > 0.6
    assert np.corrcoef(fast_power, arousal)[0, 1] > 0.6


def run_tiny_stage1(run_dir, *extra):
    stage1_teacher.main(["--run-dir", run_dir, "--synthetic-size", "tiny", "--epochs", "2", "--device", "cpu",
                         *extra])


def run_tiny_stage1_in_this_process(run_dir, *extra):
    """For the tests of what follows the features: worker processes would add seconds of start-up to each run."""
    run_tiny_stage1(run_dir, "--workers", "1", *extra)


def test_stage1_then_stage2_end_to_end(tmp_path):
    run_dir = str(tmp_path)
    run_tiny_stage1(run_dir)
    stage1 = os.path.join(run_dir, "stage1")
    names = {"teacher.pt", "embeddings.npz", "metrics.json", "training_curve.png", "held_out.png", "config.json"}
    assert set(artifacts.read_manifest(stage1)) == names
    artifacts.verify_manifest(stage1, sorted(names))
    assert not os.path.exists(os.path.join(run_dir, "stage1.partial", "checkpoint.pt"))
    teacher = torch.load(os.path.join(stage1, "teacher.pt"), weights_only=True)
    model = stage1_teacher.Teacher(4, teacher["config"]["embedding_size"])
    model.load_state_dict(teacher["state_dict"])
    embeddings = load_embeddings(os.path.join(stage1, "embeddings.npz"))
    np.testing.assert_allclose(np.linalg.norm(embeddings["embeddings"], axis=1), 1.0, rtol=1e-5)
    with open(os.path.join(stage1, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert set(embeddings["subject"]) == set(metrics["held_out_subjects"])
    assert metrics["windows"]["held_out"] == len(embeddings["embeddings"])
    assert metrics["source"] == "synthetic" and "not the paper's" in metrics["note"]
    for name in ("valence", "arousal"):
        assert set(metrics["held_out"][name]) == {"rmse", "pearson_r", "ccc", "interval"}
        assert metrics["mean_baseline"][name]["ccc"] == 0.0
    # per dataset: each held-out window counted once, under the dataset its subject belongs to
    prefixes = {"DREAMER": "dreamer-", "MAHNOB-HCI": "mahnob-"}
    assert {name: scores["windows"] for name, scores in metrics["by_dataset"].items()} == {
        name: sum(subject.startswith(prefix) for subject in embeddings["subject"]) for name, prefix in prefixes.items()}
    for name, scores in metrics["by_dataset"].items():
        assert set(scores["held_out"]["valence"]) == {"rmse", "pearson_r", "ccc", "interval"}
        assert scores["subjects"] == len({s for s in embeddings["subject"] if s.startswith(prefixes[name])})
    # per subject: each held-out subject's windows and trials; where a dataset holds out one subject, that subject's
    # figures are the dataset's
    by_subject = metrics["by_subject"]
    assert {subject: scores["windows"] for subject, scores in by_subject.items()} == dict(
        collections.Counter(embeddings["subject"].tolist()))
    assert {subject: scores["trials"] for subject, scores in by_subject.items()} == {
        subject: len(set(embeddings["trial"][embeddings["subject"] == subject])) for subject in by_subject}
    for name, prefix in prefixes.items():
        subjects = [subject for subject in by_subject if subject.startswith(prefix)]
        if len(subjects) == 1:
            assert by_subject[subjects[0]]["held_out"] == metrics["by_dataset"][name]["held_out"]
    assert any(len([s for s in by_subject if s.startswith(prefix)]) == 1 for prefix in prefixes.values())
    # Intervals are drawn over whole subjects. The tiny default holds out one subject of each dataset: a dataset's
    # one subject gets none, and every resample of the two is both (the pooled scores) or one of them twice (that
    # subject's scores, since repeating each window changes no score), so the 95% interval spans exactly the three.
    assert metrics["bootstrap"] == {"resamples": 1000, "level": 0.95, "seed": 0, "method": (
        "percentile bootstrap over the held-out subjects, each drawn with all its windows; none where one subject is "
        "held out")}
    assert all(scores["held_out"][name]["interval"] is None
               for scores in metrics["by_dataset"].values() for name in ("valence", "arousal"))
    assert len(by_subject) == 2
    for name in ("valence", "arousal"):
        for score in ("rmse", "pearson_r", "ccc"):
            values = [metrics["held_out"][name][score]] + [s["held_out"][name][score] for s in by_subject.values()]
            assert metrics["held_out"][name]["interval"][score] == pytest.approx([min(values), max(values)],
                                                                                 rel=1e-9, abs=1e-12)
    with open(os.path.join(stage1, "config.json")) as handle:
        inputs = json.load(handle)["inputs"]
    mahnob = inputs["mahnob"]["root"]
    assert inputs["mahnob"]["bdf_sha256"] == {
        os.path.join("Sessions", session, name): artifacts.sha256_file(os.path.join(mahnob, "Sessions", session, name))
        for session, name in (("1", "Part_1_S_Trial1_emotion.bdf"), ("2", "Part_1_S_Trial2_emotion.bdf"),
                              ("3", "Part_2_S_Trial1_emotion.bdf"))}
    stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])
    with np.load(os.path.join(run_dir, "stage2", "prototypes.npz")) as bank:
        assert bank["bank"].shape == (25, 128)
        assert str(bank["teacher_sha256"]) == artifacts.sha256_file(os.path.join(stage1, "teacher.pt"))


def test_stage1_resumes_after_a_crash_and_leaves_the_previous_teacher_whole(tmp_path, monkeypatch, capsys):
    run_dir = str(tmp_path)
    stage1 = os.path.join(run_dir, "stage1")
    run_tiny_stage1_in_this_process(run_dir, "--epochs", "1", "--resume")
    checkpoint = os.path.join(run_dir, "stage1.partial", "checkpoint.pt")
    assert f"--resume: no checkpoint at {checkpoint} (none was left, or the run finished); starting afresh" in \
        capsys.readouterr().out
    before = {name: artifacts.sha256_file(os.path.join(stage1, name)) for name in artifacts.read_manifest(stage1)}
    with pytest.raises(EEGFormatError, match=r"missing.mat: not a readable MATLAB file") as refused:
        stage1_teacher.main(["--run-dir", run_dir, "--dreamer", str(tmp_path / "missing.mat")])
    assert "--skip-unreadable" not in str(refused.value)  # DREAMER.mat is read whole: no trial to leave out

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(stage1_teacher, "plot_curve", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_tiny_stage1_in_this_process(run_dir)
    assert os.path.exists(os.path.join(run_dir, "stage1.partial", "checkpoint.pt"))
    # Neither a run that failed on its input nor one killed while writing touched the finished stage 1.
    assert artifacts.verify_manifest(stage1, sorted(before)) == before
    assert sorted(name for name in os.listdir(run_dir) if name.startswith("stage1.")) == [
        "stage1.lock", "stage1.partial"]
    assert os.listdir(os.path.join(run_dir, "stage1.partial")) == ["checkpoint.pt"]  # no half-written stage1/
    monkeypatch.undo()
    other_settings = rf"{re.escape(checkpoint)} was written with other settings \(lr\); rerun without --resume"
    with pytest.raises(artifacts.ArtifactError, match=other_settings):
        run_tiny_stage1_in_this_process(run_dir, "--resume", "--lr", "0.01")
    capsys.readouterr()
    run_tiny_stage1_in_this_process(run_dir, "--resume")
    out = capsys.readouterr().out
    assert "resuming after epoch 2" in out
    assert f"features of 12 trials, 12 of them from {run_dir}/cache/eeg_features/" in out
    assert os.path.exists(os.path.join(stage1, artifacts.MANIFEST))


def test_stage1_deterministic_runs_repeat_bit_for_bit(tmp_path):
    """--deterministic, meant for GPUs, on the CPU: the flag reaches torch, no op of the stage refuses it, and two runs
    end with the same teacher, bit for bit."""
    try:
        for name in ("first", "second"):
            run_tiny_stage1_in_this_process(str(tmp_path / name), "--deterministic")
            assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    first, second = (torch.load(tmp_path / name / "stage1" / "teacher.pt", weights_only=True)["state_dict"]
                     for name in ("first", "second"))
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("arguments,message", [
    (["--step-s", "0.001"], "--window-s must span at least 2 samples and --step-s 1 at the features' 128 Hz (got 2 s "
                            "and 0.001 s)"),
    (["--lr", "-1"], "argument --lr: '-1': expected a finite number > 0"),
    (["--bootstrap", "99"], "--bootstrap must be at least 100, got 99"),
    (["--noisy-channel-ratio", "1"], "--noisy-channel-ratio must be a finite number above 1, or 0 to leave out no "
                                     "channel as noisy, got 1"),
    (["--noisy-channel-ratio", "inf"], "--noisy-channel-ratio must be a finite number above 1, or 0 to leave out no "
                                       "channel as noisy, got inf"),
])
def test_settings_out_of_range_are_refused(capsys, arguments, message):
    with pytest.raises(SystemExit):
        stage1_teacher.parse_args(arguments)
    assert message in capsys.readouterr().err


def test_stage1_bad_dataset_path_names_the_file(tmp_path):
    missing = str(tmp_path / "DREAMER.mat")
    with pytest.raises(Exception, match=r"DREAMER.mat: not a readable MATLAB file"):
        stage1_teacher.main(["--run-dir", str(tmp_path), "--dreamer", missing])
