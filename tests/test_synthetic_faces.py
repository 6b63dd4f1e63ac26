"""The synthetic FERPlus default: deterministic, readable by the real reader, with FERPlus-like labels."""

import numpy as np

from ngd_ext.emotions import FER_CLASSES
from ngd_ext.data.ferplus import load_ferplus, majority_label
from ngd_ext.data.synthetic_faces import EXPRESSIONS, draw_face, make_faces, write_synthetic_ferplus


def test_faces_are_deterministic():
    first, second = make_faces(20, seed=4), make_faces(20, seed=4)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(make_faces(20, seed=5)[0], first[0])


def test_votes_follow_the_drawn_class_with_ambiguity():
    _, classes, votes = make_faces(1500, seed=6)
    assert (votes.sum(axis=1) == 10).all()
    labels = np.array([-1 if (label := majority_label(v)) is None else label for v in votes])
    kept = labels >= 0
    assert 0.75 < kept.mean() < 0.97  # the majority rule drops the ambiguous faces
    assert (labels[kept] == classes[kept]).mean() > 0.85
    shares = np.bincount(classes, minlength=8) / len(classes)
    assert shares[0] > shares[1] > shares[2] and shares[5] < 0.02 and shares[7] < 0.02  # FERPlus-like


def test_expressions_differ_where_they_should():
    rng = np.random.default_rng(7)
    mouth = slice(30, 40), slice(14, 34)

    def mean_mouth_darkness(name):
        faces = [draw_face(rng, EXPRESSIONS[name]) for _ in range(30)]
        return np.mean([255 - face[mouth].mean() for face in faces])

    assert mean_mouth_darkness("surprise") > mean_mouth_darkness("neutral") + 5  # the open mouth


def test_styles_render_differently():
    rng = np.random.default_rng(8)
    spread = {style: np.mean([draw_face(rng, EXPRESSIONS["neutral"], style).std() for _ in range(20)])
              for style in ("ferplus", "ckplus", "affectnet")}
    assert spread["ckplus"] > spread["ferplus"] > spread["affectnet"]


def test_written_files_go_through_the_real_reader(tmp_path):
    write_synthetic_ferplus(str(tmp_path), seed=9, train=300, valid=60, test=60)
    splits = load_ferplus(str(tmp_path))
    sizes = {split: len(data.labels) for split, data in splits.items()}
    assert 240 < sizes["train"] < 300 and 40 < sizes["valid"] <= 60 and 40 < sizes["test"] <= 60
    assert splits["train"].images.shape[1:] == (48, 48) and splits["train"].images.dtype == np.uint8
    assert set(splits["train"].labels.tolist()) <= set(range(len(FER_CLASSES)))


def test_no_image_is_in_two_splits(tmp_path):
    import hashlib

    write_synthetic_ferplus(str(tmp_path), seed=10, train=400, valid=100, test=100)
    splits = load_ferplus(str(tmp_path))
    hashes = {split: {hashlib.sha256(image.tobytes()).hexdigest() for image in data.images}
              for split, data in splits.items()}
    assert len(hashes["train"]) == len(splits["train"].images)  # no duplicate within a split either
    assert not hashes["train"] & hashes["valid"] and not hashes["train"] & hashes["test"]
    assert not hashes["valid"] & hashes["test"]
