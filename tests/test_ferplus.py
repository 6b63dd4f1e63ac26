"""FERPlus: the official label rule on the official vote files, both layouts, and bad input."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from ngd_ext.emotions import FER_CLASSES
from ngd_ext.data import ferplus
from ngd_ext.data.ferplus import (SPLITS, FerPlusError, apply_rule, data_summary, load_ferplus, load_ferplus_cached,
                             majority_label, probability_label, read_votes)

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ferplus")
official = pytest.mark.skipif(not os.path.isfile(os.path.join(OFFICIAL, "fer2013new.csv")),
                              reason="the official FERPlus vote files are not here")


def loop_majority(votes):
    """The rule as FERPlus's own generator states it, one vote at a time."""
    votes = [0 if v <= 1 else v for v in votes]
    top = max(range(10), key=lambda i: (votes[i], -i))
    if votes[top] > 0.5 * sum(votes) and top < 8:
        return top
    return None


@pytest.mark.parametrize("votes,label", [
    ([4, 0, 0, 1, 3, 2, 0, 0, 0, 0], None),      # 4 of 9 after the single vote goes: no majority
    ([6, 0, 1, 1, 0, 0, 0, 0, 2, 0], 0),         # 6 of 8
    ([0, 9, 0, 0, 0, 0, 0, 0, 1, 0], 1),
    ([0, 0, 0, 0, 0, 0, 0, 0, 10, 0], None),     # unknown
    ([2, 0, 0, 0, 0, 0, 0, 0, 0, 8], None),      # not a face
    ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], None),      # exactly half is not more than half
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None),      # every vote single: nothing left
])
def test_majority_rule(votes, label):
    assert majority_label(votes) == label == loop_majority(votes)


def test_probability_rule():
    np.testing.assert_allclose(probability_label([6, 0, 1, 1, 0, 0, 0, 0, 2, 0]), np.eye(8)[0])
    np.testing.assert_allclose(probability_label([4, 0, 0, 0, 3, 2, 0, 0, 1, 0])[[0, 4, 5]], [4 / 9, 3 / 9, 2 / 9])
    assert probability_label([2, 0, 0, 0, 0, 0, 0, 0, 3, 5]) is None


# Per-class counts after the majority rule (FERPlus class order). The two official vote files disagree on the
# votes of 1602 images, so the layouts give different counts; the folders' totals (25045 / 3191 / 3137) are
# the ones usually quoted for FERPlus.
COUNTS = {
    "fer2013new.csv": {"train": [8740, 7287, 3149, 3014, 2100, 119, 532, 119],
                       "valid": [1182, 865, 415, 351, 287, 24, 62, 13],
                       "test": [1090, 893, 396, 384, 273, 18, 83, 16]},
    "label.csv folders": {"train": [8733, 7284, 3136, 3022, 2098, 116, 536, 120],
                          "valid": [1180, 862, 411, 348, 289, 25, 60, 16],
                          "test": [1083, 892, 394, 382, 269, 16, 86, 15]},
}


@official
@pytest.mark.parametrize("layout", sorted(COUNTS))
def test_official_votes_give_the_known_counts(layout, tmp_path):
    if layout == "fer2013new.csv":
        rows = read_votes(OFFICIAL)
        assert len(rows) == 35887 - 173  # every row but those without an image name (FERPlus dropped those)
    else:
        for name in ("FER2013Train", "FER2013Valid", "FER2013Test"):
            os.symlink(os.path.join(os.path.abspath(OFFICIAL), name), tmp_path / name)
        rows = read_votes(str(tmp_path))  # no fer2013new.csv here: the folders' label.csv files
    for split in SPLITS:
        kept, labels, _ = apply_rule(rows, split)
        assert [majority_label(r.votes) for r in kept] == [loop_majority(list(r.votes)) for r in kept]
        assert np.bincount(labels, minlength=8).tolist() == COUNTS[layout][split]


def write_csv_layout(folder, rows, icml_columns=False):
    """fer2013.csv + fer2013new.csv. rows: (usage, name, votes, image 48x48). icml_columns: fer2013.csv with the
    columns of Kaggle's icml_face_data.csv, "emotion, Usage, pixels"."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "fer2013.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", " Usage", " pixels"] if icml_columns else ["emotion", "pixels", "Usage"])
        for usage, _, _, image in rows:
            pixels = " ".join(map(str, image.ravel()))
            writer.writerow([0, usage, pixels] if icml_columns else [0, pixels, usage])
    with open(os.path.join(folder, "fer2013new.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Usage", "Image name", *FER_CLASSES, "unknown", "NF"])
        for usage, name, votes, _ in rows:
            writer.writerow([usage, name, *votes])


def example_rows(rng):
    image = lambda: rng.integers(0, 256, (48, 48))  # noqa: E731
    return [("Training", "fer0.png", [0, 9, 0, 0, 0, 0, 0, 0, 1, 0], image()),
            ("Training", "", [9, 0, 0, 0, 0, 0, 0, 0, 1, 0], image()),          # dropped by FERPlus
            ("Training", "fer2.png", [0, 0, 0, 0, 0, 0, 0, 0, 10, 0], image()),  # unknown: dropped
            ("PublicTest", "fer3.png", [0, 0, 8, 0, 0, 0, 0, 2, 0, 0], image()),
            ("PrivateTest", "fer4.png", [0, 0, 0, 7, 3, 0, 0, 0, 0, 0], image())]


def write_folder_layout(folder, rows, bits=8):
    """FER2013{Train,Valid,Test}/ with label.csv and PNG images of `bits` bits per pixel (16: an 8-bit image widened,
    v -> v * 257)."""
    for usage, name, votes, image in rows:
        if not name:
            continue
        split_folder = folder / {"Training": "FER2013Train", "PublicTest": "FER2013Valid",
                                 "PrivateTest": "FER2013Test"}[usage]
        split_folder.mkdir(parents=True, exist_ok=True)
        pixels = image.astype(np.uint8) if bits == 8 else image.astype(np.uint16) * 257
        Image.fromarray(pixels).save(split_folder / name)
        with open(split_folder / "label.csv", "a", newline="") as handle:
            csv.writer(handle).writerow([name, "(0, 0, 48, 48)", *votes])


@pytest.mark.parametrize("bits", [8, 16])
def test_both_layouts_load_the_same_images(tmp_path, bits):
    rows = example_rows(np.random.default_rng(0))
    write_csv_layout(str(tmp_path / "csv"), rows)
    from_csv = load_ferplus(str(tmp_path / "csv"))
    assert [len(from_csv[s].labels) for s in SPLITS] == [1, 1, 1]
    np.testing.assert_array_equal(from_csv["train"].images[0], rows[0][3])  # joined by position, not by name
    assert from_csv["valid"].labels.tolist() == [2] and from_csv["test"].labels.tolist() == [3]
    write_folder_layout(tmp_path / "png", rows, bits)
    from_png = load_ferplus(str(tmp_path / "png"))
    for split in SPLITS:
        np.testing.assert_array_equal(from_png[split].images, from_csv[split].images)
        np.testing.assert_array_equal(from_png[split].labels, from_csv[split].labels)
    summary = data_summary(from_png)
    assert summary["valid"] == {"images": 1, "per_class": {**{c: 0 for c in FER_CLASSES}, "surprise": 1}}


def test_kaggles_icml_face_data_csv_serves_as_fer2013_csv(tmp_path):
    rows = example_rows(np.random.default_rng(4))
    write_csv_layout(str(tmp_path / "fer2013"), rows)
    write_csv_layout(str(tmp_path / "icml"), rows, icml_columns=True)
    expected, actual = load_ferplus(str(tmp_path / "fer2013")), load_ferplus(str(tmp_path / "icml"))
    for split in SPLITS:
        np.testing.assert_array_equal(actual[split].images, expected[split].images)
        np.testing.assert_array_equal(actual[split].labels, expected[split].labels)
    (tmp_path / "icml" / "fer2013.csv").write_text("emotion,Usage,image\n")
    with pytest.raises(FerPlusError, match=r"fer2013.csv: header \['emotion', 'Usage', 'image'\] does not name the "
                                           r"columns emotion, pixels and Usage"):
        load_ferplus(str(tmp_path / "icml"))


@pytest.mark.parametrize("edit,message", [
    (lambda rows: rows.__setitem__(0, (*rows[0][:3], np.zeros((47, 48), int))),
     r"fer2013.csv, row 2: 2256 pixel values, expected 2304"),
    (lambda rows: rows.__setitem__(3, (rows[3][0], rows[3][1], [0, 0, 8, 0, 0, 0, 0, 3, 0, 0], rows[3][3])),
     r"fer2013new.csv, row 5: the votes sum to 11; FERPlus images have at most 10 annotators"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, edit, message):
    rows = example_rows(np.random.default_rng(1))
    edit(rows)
    write_csv_layout(str(tmp_path), rows)
    with pytest.raises(FerPlusError, match=message):
        load_ferplus(str(tmp_path))


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n not a PNG", r"FER2013Valid/fer3.png: not an image file PIL can decode"),
    (None, r"FER2013Valid/fer3.png: a 32-bit floating-point image \(PIL mode F\)"),
    ("truncated", r"FER2013Valid/fer3.png: corrupt or truncated image \(image file is truncated\)"),
])
def test_an_image_that_cannot_be_used_is_named(tmp_path, content, message):
    write_folder_layout(tmp_path, example_rows(np.random.default_rng(3)))
    path = tmp_path / "FER2013Valid" / "fer3.png"
    if content is None:
        Image.fromarray(np.full((48, 48), 0.5, np.float32)).save(path, format="TIFF")  # misnamed, as happens
    elif content == "truncated":  # a copy cut short
        path.write_bytes(path.read_bytes()[:-200])
    else:
        path.write_bytes(content)
    with pytest.raises(FerPlusError, match=rf"unreadable FERPlus image: .*{message}"):
        load_ferplus(str(tmp_path))


def test_empty_csv_files_are_named(tmp_path):
    write_csv_layout(str(tmp_path), example_rows(np.random.default_rng(5)))
    (tmp_path / "fer2013new.csv").write_text("")
    with pytest.raises(FerPlusError, match=r"fer2013new.csv: the file is empty; expected FERPlus's votes under the "
                                           r"header Usage, Image name, neutral"):
        load_ferplus(str(tmp_path))
    write_csv_layout(str(tmp_path), example_rows(np.random.default_rng(5)))
    (tmp_path / "fer2013.csv").write_text("")
    with pytest.raises(FerPlusError, match=r"fer2013.csv: the file is empty; expected FER2013's rows under the header "
                                           r"emotion, pixels, Usage"):
        load_ferplus(str(tmp_path))


def test_a_folder_of_neither_layout_is_named_with_what_is_missing(tmp_path):
    with pytest.raises(FerPlusError, match=r"nothing: not a folder; expected a FERPlus folder \(fer2013.csv \+ "
                                           r"fer2013new.csv, or FER2013Train/, FER2013Valid/ and FER2013Test/"):
        load_ferplus_cached(str(tmp_path / "nothing"), str(tmp_path / "cache"))
    os.makedirs(tmp_path / "FER2013Valid")
    (tmp_path / "FER2013Valid" / "label.csv").write_text("")
    with pytest.raises(FerPlusError, match=r"neither fer2013new.csv nor FER2013Train/label.csv, FER2013Test/label.csv "
                                           r"is there"):
        load_ferplus_cached(str(tmp_path), str(tmp_path / "cache"))
    (tmp_path / "fer2013new.csv").write_text("")
    with pytest.raises(FerPlusError, match=r"fer2013new.csv needs fer2013.csv beside it"):
        load_ferplus_cached(str(tmp_path), str(tmp_path / "cache"))


def test_truncated_csv_row(tmp_path):
    write_csv_layout(str(tmp_path), example_rows(np.random.default_rng(2)))
    path = tmp_path / "fer2013.csv"
    text = path.read_text().splitlines()
    text[3] = text[3].split(",")[0] + "," + text[3].split(",")[1][:100]
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(FerPlusError, match=r"fer2013.csv, row 4: 2 fields, expected emotion, pixels, Usage"):
        load_ferplus(str(tmp_path))
    text[3] = "0,12 ab 7,Training"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(FerPlusError, match=r"fer2013.csv, row 4: pixels must be integers separated by spaces"):
        load_ferplus(str(tmp_path))


def test_images_are_decoded_once_and_cached_by_content(tmp_path, monkeypatch):
    folder, cache = str(tmp_path / "csv"), str(tmp_path / "cache")
    write_csv_layout(folder, example_rows(np.random.default_rng(3)))
    first, key = load_ferplus_cached(folder, cache)

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again")

    with monkeypatch.context() as patch:
        patch.setattr(ferplus, "load_ferplus", no_parsing)
        again, same_key = load_ferplus_cached(folder, cache)
    assert same_key == key
    for split in SPLITS:
        np.testing.assert_array_equal(again[split].images, first[split].images)
        np.testing.assert_array_equal(again[split].labels, first[split].labels)
        assert again[split].names == first[split].names
    entry = next((tmp_path / "cache").glob("ferplus-*.npz"))  # a damaged entry is decoded anew and rewritten
    entry.write_bytes(entry.read_bytes()[:1000])
    retaken, _ = load_ferplus_cached(folder, cache)
    np.testing.assert_array_equal(retaken["train"].images, first["train"].images)
    assert ferplus.read_cache_entry(str(entry), lambda data: data["train_images"].shape) == first["train"].images.shape
    with monkeypatch.context() as patch:  # other decoding code: the same data, decoded anew into another entry
        patch.setattr(ferplus, "decoder_fingerprint", lambda: "another decoder")
        decoded_again, key_after = load_ferplus_cached(folder, cache)
    assert key_after == key and len(list((tmp_path / "cache").glob("ferplus-*.npz"))) == 2
    np.testing.assert_array_equal(decoded_again["train"].images, first["train"].images)
    rows = example_rows(np.random.default_rng(4))  # other pixels: another key, parsed anew
    write_csv_layout(folder, rows)
    changed, other_key = load_ferplus_cached(folder, cache)
    assert other_key != key
    np.testing.assert_array_equal(changed["train"].images[0], rows[0][3])
