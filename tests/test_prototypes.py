"""The V/A grid, the prototype bank (SPEC section 2), the Proto-KD targets, and stage 2 end to end."""

import json
import os

import numpy as np
import pytest
import torch

import stage2_prototypes
from ngd_ext import artifacts, reference
from ngd_ext.prototypes import BankError, axis_bins, build_bank, proto_kd_targets, va_bins
from ngd_ext.teacher_embeddings import EmbeddingsError, load_embeddings, save_embeddings


def test_axis_bins_nearest_centre_and_ties_to_the_lower_index():
    # G = 5: centres -0.8, -0.4, 0.0, 0.4, 0.8
    values = [-1.0, -0.8, -0.6, -0.2, 0.0, 0.2, 0.21, 0.6, 0.61, 1.0]
    assert axis_bins(values, 5).tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 4, 4]


def test_va_bins_index_valence_major():
    assert va_bins([0.8, -0.8, 0.0], [-0.8, 0.8, 0.4], 5).tolist() == [4 * 5 + 0, 0 * 5 + 4, 2 * 5 + 3]


def test_bank_matches_a_hand_computation_with_empty_bins_and_ties():
    # G = 3: centres -0.8, 0, 0.8. Bin 8 (0.8, 0.8) gets two embeddings, bin 0 one, and (0.4, 0.4) is half-way
    # between centres on both axes, so it goes to the lower bins: (0, 0), bin 4.
    embeddings = [[3.0, 4.0], [0.0, 2.0], [2.0, 0.0], [0.0, -5.0]]
    valence = [0.9, 0.7, -0.8, 0.4]
    arousal = [0.8, 0.75, -1.0, 0.4]
    bank = build_bank(embeddings, valence, arousal, grid=3)
    assert bank.counts.tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 2]
    mean_8 = np.array([0.3, 0.9]) / np.linalg.norm([0.3, 0.9])  # mean of (0.6, 0.8) and (0, 1), normalised
    own = {0: [1.0, 0.0], 4: [0.0, -1.0], 8: mean_8}
    # Empty bins copy the nearest non-empty bin by centre distance; equal distances go to the lower index:
    # bin 1 (-0.8, 0) is 0.8 from bins 0 and 4, bin 7 (0.8, 0) is 0.8 from bins 4 and 8.
    assert bank.filled_from.tolist() == [0, 0, 4, 0, 4, 4, 4, 4, 8]
    for k, source in enumerate(bank.filled_from):
        np.testing.assert_allclose(bank.bank[k], own[source], atol=1e-12)
    np.testing.assert_allclose(bank.centres[7], [0.8, 0.0])


def test_bank_needs_two_non_empty_bins():
    with pytest.raises(BankError, match=r"only 1 of the 25 bins hold embeddings; a bank needs at least 2"):
        build_bank(np.ones((4, 3)), [0.1] * 4, [0.0] * 4, grid=5)


def test_bank_rejects_mismatched_lengths():
    with pytest.raises(BankError, match=r"N x E with N valence and N arousal values"):
        build_bank(np.ones((4, 3)), [0.1] * 3, [0.0] * 4)


def test_targets_are_the_distribution_of_the_anchor_prototype():
    rng = np.random.default_rng(0)
    bank = build_bank(rng.normal(size=(400, 16)), rng.uniform(-1, 1, 400), rng.uniform(-1, 1, 400), grid=5)
    anchors = [(0.0, 0.0), (0.8, 0.4), (0.3, 0.8), (-0.7, -0.4)]
    tau = 0.9
    table = proto_kd_targets(bank.bank, 5, anchors, tau)
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-12)
    # A student embedding equal to p_b(c) has Proto-KD zero against row c.
    bins = va_bins([a[0] for a in anchors], [a[1] for a in anchors], 5)
    z = torch.tensor(bank.bank[bins])
    labels = torch.arange(len(anchors))
    proto_kd, _, _ = reference.proto_dgeo_loss(z, torch.tensor(bank.bank), torch.tensor(table), labels,
                                               torch.zeros(len(anchors), dtype=torch.bool), tau=tau)
    assert proto_kd.item() == pytest.approx(0.0, abs=1e-12)


def write_stage1(run_dir, count=600, size=32, seed=0, source="synthetic"):
    """A stage-1 folder as stage 1 writes it: embeddings, a teacher file and the manifest."""
    rng = np.random.default_rng(seed)
    stage1 = os.path.join(run_dir, "stage1")
    os.makedirs(stage1)
    embeddings = rng.normal(size=(count, size))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    save_embeddings(os.path.join(stage1, "embeddings.npz"), embeddings, rng.uniform(-1, 1, count),
                    rng.uniform(-1, 1, count), rng.integers(0, 5, count), rng.integers(0, 18, count), source)
    with open(os.path.join(stage1, "teacher.pt"), "wb") as handle:
        handle.write(b"teacher weights")
    artifacts.write_manifest(stage1)
    return stage1


def test_stage2_end_to_end(tmp_path):
    run_dir = str(tmp_path)
    stage1 = write_stage1(run_dir)
    stage2_prototypes.main(["--run-dir", run_dir])
    out = os.path.join(run_dir, "stage2")
    files = {"prototypes.npz", "summary.json", "occupancy.png", "similarity.png", "config.json"}
    assert set(artifacts.read_manifest(out)) == files
    artifacts.verify_manifest(out, sorted(files))
    with np.load(os.path.join(out, "prototypes.npz")) as saved:
        assert saved["bank"].shape == (25, 32) and int(saved["G"]) == 5 and int(saved["E"]) == 32
        assert saved["counts"].sum() == 600
        np.testing.assert_allclose(np.linalg.norm(saved["bank"], axis=1), 1.0, rtol=1e-6)
        assert str(saved["teacher_sha256"]) == artifacts.sha256_file(os.path.join(stage1, "teacher.pt"))
    with open(os.path.join(out, "config.json")) as handle:
        config = json.load(handle)
    assert config["arguments"]["grid"] == 5
    assert config["inputs"]["stage1/embeddings.npz"] == artifacts.sha256_file(os.path.join(stage1, "embeddings.npz"))
    for picture in ("occupancy.png", "similarity.png"):
        with open(os.path.join(out, picture), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_stage2_denser_grid_is_sparser(tmp_path):
    write_stage1(str(tmp_path), count=60)
    stage2_prototypes.main(["--run-dir", str(tmp_path), "--grid", "5"])
    with open(tmp_path / "stage2" / "summary.json") as handle:
        empty_5 = len(json.load(handle)["empty_bins"])
    stage2_prototypes.main(["--run-dir", str(tmp_path), "--grid", "7"])
    with open(tmp_path / "stage2" / "summary.json") as handle:
        summary_7 = json.load(handle)
    assert len(summary_7["bins"]) == 49
    assert len(summary_7["empty_bins"]) > empty_5


def test_a_killed_stage2_leaves_the_previous_bank_whole(tmp_path, monkeypatch):
    write_stage1(str(tmp_path))
    stage2_prototypes.main(["--run-dir", str(tmp_path)])
    out = tmp_path / "stage2"
    before = {name: artifacts.sha256_file(out / name) for name in artifacts.read_manifest(str(out))}

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage2_prototypes, "plot_similarity", killed)
    with pytest.raises(KeyboardInterrupt):
        stage2_prototypes.main(["--run-dir", str(tmp_path), "--grid", "7"])
    assert artifacts.verify_manifest(str(out), sorted(before)) == before
    assert sorted(os.listdir(tmp_path)) == ["stage1", "stage2", "stage2.lock"]  # no half-written folder beside it


def test_stage2_refuses_a_tampered_embeddings_file(tmp_path):
    stage1 = write_stage1(str(tmp_path))
    path = os.path.join(stage1, "embeddings.npz")
    with open(path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(artifacts.ArtifactError, match=r"embeddings.npz does not match SHA256SUMS"):
        stage2_prototypes.main(["--run-dir", str(tmp_path)])
    assert not os.path.exists(tmp_path / "stage2")


def test_stage2_refuses_an_unfinished_stage1(tmp_path):
    stage1 = write_stage1(str(tmp_path))
    os.remove(os.path.join(stage1, "SHA256SUMS"))
    with pytest.raises(artifacts.ArtifactError, match=r"SHA256SUMS is missing"):
        stage2_prototypes.main(["--run-dir", str(tmp_path)])


def test_load_embeddings_errors_name_the_file_and_problem(tmp_path):
    path = str(tmp_path / "embeddings.npz")
    rng = np.random.default_rng(1)
    good = dict(embeddings=rng.normal(size=(5, 4)), valence=np.zeros(5), arousal=np.zeros(5),
                subject=np.arange(5), trial=np.arange(5), source="synthetic")

    def expect(message, **changes):
        save_embeddings(path, **{**good, **changes})
        with pytest.raises(EmbeddingsError, match=message):
            load_embeddings(path)

    bad = good["embeddings"].copy()
    bad[3, 1] = np.nan
    expect(r"embeddings.npz: embeddings is not finite in row 3", embeddings=bad)
    expect(r"embeddings.npz: valence\[2\] = 1.5 is outside \[-1, 1\]", valence=np.array([0, 0, 1.5, 0, 0]))
    expect(r"embeddings.npz: trial must have shape \(5,\), got \(4,\)", trial=np.arange(4))
    np.savez(path, embeddings=good["embeddings"])
    with pytest.raises(EmbeddingsError, match=r"missing arrays \['valence', 'arousal', 'subject', 'trial', 'source'\]"):
        load_embeddings(path)
    with open(path, "wb") as handle:
        handle.write(b"not an npz")
    with pytest.raises(EmbeddingsError, match=r"embeddings.npz: not a readable .npz file"):
        load_embeddings(path)
