"""The face sets as torch Datasets: FERPlus's lengths under the official rule on the official vote files, its items
against the reader's arrays, and the target sets' Datasets against the readers stage 4 uses."""

import os

import numpy as np
import pytest
import torch

from ngd_ext.data import AffectNet, CKPlus, FaceManifest, FERPlus
from ngd_ext.data.faces import affectnet_records, ckplus_records, read_faces
from ngd_ext.data.ferplus import load_ferplus
from ngd_ext.data.synthetic_faces import write_synthetic_affectnet, write_synthetic_ckplus, write_synthetic_ferplus
from test_ferplus import COUNTS, OFFICIAL, official


@official
@pytest.mark.parametrize("layout", sorted(COUNTS))
def test_ferplus_lengths_are_the_official_rules_counts(layout, tmp_path):
    root = OFFICIAL
    if layout != "fer2013new.csv":  # the folders' label.csv files alone
        root = str(tmp_path)
        for name in ("FER2013Train", "FER2013Valid", "FER2013Test"):
            os.symlink(os.path.join(os.path.abspath(OFFICIAL), name), tmp_path / name)
    for split, counts in COUNTS[layout].items():
        dataset = FERPlus(root, split)
        assert len(dataset) == sum(counts)
        assert np.bincount(dataset.labels, minlength=8).tolist() == counts


def test_ferplus_items_are_the_readers_images_and_labels(tmp_path):
    root = str(tmp_path / "ferplus")
    write_synthetic_ferplus(root, seed=1, train=64, valid=32, test=32)
    expected = load_ferplus(root)
    for split in ("train", "valid", "test"):
        dataset = FERPlus(root, split, cache_dir=str(tmp_path / "cache"))
        images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
        assert images.shape == (len(dataset), 1, 48, 48) and images.dtype == torch.uint8
        np.testing.assert_array_equal(images[:, 0].numpy(), expected[split].images)
        np.testing.assert_array_equal(labels.numpy(), expected[split].labels)
    soft = FERPlus(root, "train", label_rule="probability", transform=lambda image: image.float() / 255)
    image, target = soft[3]
    assert image.dtype == torch.float32 and target.shape == (8,) and target.sum().item() == pytest.approx(1.0)
    assert FERPlus(root, "valid", label_rule="probability").label_rule == "majority"  # valid and test: majority
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'valid', 'test'\)"):
        FERPlus(root, "validation")


def test_target_sets_are_the_readers_faces(tmp_path):
    ckplus, affectnet = str(tmp_path / "ckplus"), str(tmp_path / "affectnet")
    write_synthetic_ckplus(ckplus, seed=2, sequences=8)
    write_synthetic_affectnet(affectnet, seed=2, per_class=3)
    for dataset, faces in ((CKPlus(ckplus), read_faces("CK+", *ckplus_records(ckplus))),
                           (AffectNet(affectnet), read_faces("AffectNet", *affectnet_records(affectnet)))):
        assert len(dataset) == len(faces.labels)
        image, label = dataset[len(dataset) - 1]
        assert image.shape == (1, 48, 48) and label == faces.labels[-1]
        np.testing.assert_array_equal(image[0].numpy(), faces.images[-1])
    assert AffectNet(affectnet).faces.va is not None  # its valence/arousal ratings come along
    manifest = tmp_path / "faces.csv"
    manifest.write_text("image_path,label_id\n" + "".join(
        f"{os.path.relpath(path, tmp_path)},{index % 2}\n"
        for index, path in enumerate(AffectNet(affectnet).faces.paths[:4])))
    (tmp_path / "classes.json").write_text('{"0": "anger", "1": "fear"}')
    dataset = FaceManifest(str(manifest), class_map=str(tmp_path / "classes.json"))
    assert [dataset[i][1] for i in range(len(dataset))] == [4, 6, 4, 6]
