"""Every reader of a user's files, given damaged copies of a valid file (cut short, bytes changed, inserted or
deleted at seeded random places), either reads it or raises its dataset's error naming a file of the dataset; never
another exception from deep inside."""

import os
import random

import numpy as np
import pytest
from PIL import Image

from ngd_ext.data import eeg as eeg_formats, faces as face_datasets, ferplus
from ngd_ext.data.eeg import EEGFormatError
from ngd_ext.data.faces import DatasetError
from ngd_ext.data.ferplus import FerPlusError
from ngd_ext.data.synthetic_eeg import ensure_synthetic_eeg
from ngd_ext.data.synthetic_faces import synthetic_ferplus, write_synthetic_affectnet, write_synthetic_ckplus

MUTATIONS = 25
INSERTS = (b",", b"\n", b'"', b"-1", b"nan", b"\x00", b"999", b"\xff")


def damaged(data, rng):
    data = bytearray(data)
    kind, at = rng.randrange(4), rng.randrange(len(data))
    if kind == 0:
        del data[at:]
    elif kind == 1:
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 2:
        data[at:at] = rng.choice(INSERTS)
    else:
        del data[at:at + rng.randrange(1, 50)]
    return bytes(data)


def only_files(root, suffix):
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
                  if name.endswith(suffix))


def files_and_readers(tmp_path):
    """(id, file to damage, reader of its dataset, the dataset's error, the dataset's folder)."""
    ferplus_csv = synthetic_ferplus(str(tmp_path / "ferplus_csv"), "tiny", 0, write=True)
    ferplus_folders = str(tmp_path / "ferplus_folders")
    for name in ferplus.FOLDER_SPLIT.values():
        os.makedirs(os.path.join(ferplus_folders, name))
        Image.fromarray(np.full((48, 48), 90, np.uint8)).save(os.path.join(ferplus_folders, name, "fer0.png"))
        with open(os.path.join(ferplus_folders, name, "label.csv"), "w") as handle:
            handle.write("fer0.png,(0, 0, 48, 48),0,9,0,0,0,0,0,0,1,0\n")
    affectnet = str(tmp_path / "affectnet")
    write_synthetic_affectnet(affectnet, 0, per_class=2)
    ckplus = str(tmp_path / "ckplus")
    write_synthetic_ckplus(ckplus, 0, sequences=3)
    images = tmp_path / "images"
    images.mkdir()
    colour = (np.random.default_rng(0).random((90, 70, 3)) * 255).astype(np.uint8)
    for suffix in ("png", "jpg"):
        Image.fromarray(colour).save(images / f"face.{suffix}")
    manifest = images / "faces.csv"
    manifest.write_text("path,label,x,y,width,height\nface.png,happy,,,,\nface.jpg,2,1,2,30,40\n")
    crops = tmp_path / "affectnet_crops" / "val_set"
    for n in range(2):
        (crops / "images").mkdir(parents=True, exist_ok=True)
        (crops / "annotations").mkdir(exist_ok=True)
        Image.fromarray(colour).save(crops / "images" / f"{n}.jpg")
        np.save(crops / "annotations" / f"{n}_exp.npy", np.array(str(n + 1)))
    dreamer, mahnob = ensure_synthetic_eeg(str(tmp_path / "eeg"), 5, dreamer_subjects=2, dreamer_clips=2,
                                           dreamer_seconds=4, mahnob_subjects=1, mahnob_sessions_per_subject=1,
                                           mahnob_seconds=4)

    def read_images(manifest_path):
        return face_datasets.read_faces("faces", *face_datasets.manifest_records(manifest_path), workers=1)

    def read_mahnob():
        for session in eeg_formats.scan_mahnob(mahnob).sessions:
            eeg_formats.read_mahnob_trial(session)

    return [
        ("fer2013new.csv", os.path.join(ferplus_csv, "fer2013new.csv"), lambda: ferplus.load_ferplus(ferplus_csv),
         FerPlusError, ferplus_csv),
        ("fer2013.csv", os.path.join(ferplus_csv, "fer2013.csv"), lambda: ferplus.load_ferplus(ferplus_csv),
         FerPlusError, ferplus_csv),
        ("label.csv", os.path.join(ferplus_folders, "FER2013Valid", "label.csv"),
         lambda: ferplus.load_ferplus(ferplus_folders), FerPlusError, ferplus_folders),
        ("FERPlus png", os.path.join(ferplus_folders, "FER2013Test", "fer0.png"),
         lambda: ferplus.load_ferplus(ferplus_folders), FerPlusError, ferplus_folders),
        ("AffectNet csv", only_files(affectnet, ".csv")[0], lambda: face_datasets.affectnet_records(affectnet),
         DatasetError, affectnet),
        ("CK+ emotion", only_files(ckplus, "_emotion.txt")[0], lambda: face_datasets.ckplus_records(ckplus),
         DatasetError, ckplus),
        ("manifest", str(manifest), lambda: read_images(str(manifest)), DatasetError, str(images)),
        ("png", str(images / "face.png"), lambda: read_images(str(manifest)), DatasetError, str(images)),
        ("jpg", str(images / "face.jpg"), lambda: read_images(str(manifest)), DatasetError, str(images)),
        ("session.xml", only_files(mahnob, "session.xml")[0], read_mahnob, EEGFormatError, mahnob),
        ("bdf", only_files(mahnob, ".bdf")[0], read_mahnob, EEGFormatError, mahnob),
        ("DREAMER.mat", dreamer, lambda: list(eeg_formats.iter_dreamer(dreamer)), EEGFormatError, dreamer),
        ("AffectNet _exp.npy", str(crops / "annotations" / "1_exp.npy"),
         lambda: face_datasets.affectnet_records(str(crops.parent)), DatasetError, str(crops)),
    ]


# numpy says so when a damaged .npy header happens to parse only as Python 2 wrote them
@pytest.mark.filterwarnings("ignore:Reading `.npy` or `.npz` file required additional header parsing")
def test_damaged_files_are_read_or_named(tmp_path):
    rng = random.Random(0)
    escaped, refused = [], 0
    for name, path, read, error, dataset in files_and_readers(tmp_path):
        with open(path, "rb") as handle:
            original = handle.read()
        for _ in range(MUTATIONS):
            with open(path, "wb") as handle:
                handle.write(damaged(original, rng))
            try:
                read()
            except error as raised:
                refused += 1
                if dataset not in str(raised):
                    escaped.append(f"{name}: {raised} (names no file of {dataset})")
            except Exception as raised:  # noqa: BLE001  (what this test looks for)
                escaped.append(f"{name}: {type(raised).__name__}: {raised}")
        with open(path, "wb") as handle:
            handle.write(original)
    assert not escaped, "\n".join(escaped)
    assert refused > 200  # most damage is caught, not read as data (264 of the 325 damaged copies)
