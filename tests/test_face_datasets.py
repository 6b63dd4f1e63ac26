"""The evaluation-set readers on small fixtures in their real layouts, the face crops, and bad input."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from ngd_ext.emotions import FER_CLASSES
from ngd_ext.data.face_crop import CROP_MARGIN, FaceCropper, cut
from ngd_ext.data.faces import (AFFECTNET_COLUMNS, DatasetError, affectnet_records, ckplus_records, class_index,
                                   manifest_records, read_class_map, read_faces)
from ngd_ext.data.synthetic_faces import EXPRESSIONS, draw_face, place_face


@pytest.fixture(scope="module")
def cropper():
    return FaceCropper()


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def frame_with_face(seed, shape=(200, 260), side=110):
    rng = np.random.default_rng(seed)
    return place_face(rng, draw_face(rng, EXPRESSIONS["happiness"], "ckplus"), shape, side, "ckplus")


def write_affectnet_csv(folder, rows, header=True):
    path = os.path.join(folder, "Manually_Annotated_file_lists", "validation.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(AFFECTNET_COLUMNS)
        writer.writerows(rows)
    return path


def affectnet_rows(folder, codes):
    """One 40 x 60 colour image per code, white inside its face box (10, 5, 20, 20) and black outside."""
    rows = []
    for i, code in enumerate(codes):
        image = np.zeros((40, 60, 3), np.uint8)
        image[5:25, 10:30] = 255
        save(os.path.join(folder, "Manually_Annotated_Images", "7", f"{i}.png"), image)
        rows.append([f"7/{i}.png", 10, 5, 20, 20, "1.0;2.0", code, "0.5", "-0.2"])
    return rows


@pytest.mark.parametrize("header", [True, False])
def test_affectnet_csv_remaps_every_code_and_counts_the_dropped(tmp_path, header):
    folder = str(tmp_path)
    write_affectnet_csv(folder, affectnet_rows(folder, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]), header)
    records, dropped = affectnet_records(folder)
    # AffectNet 0 Neutral 1 Happy 2 Sad 3 Surprise 4 Fear 5 Disgust 6 Anger 7 Contempt, in FERPlus's order
    assert [r.label for r in records] == [0, 1, 3, 2, 6, 5, 4, 7]
    assert dropped == {"expression 8 (None)": 1, "expression 9 (Uncertain)": 1, "expression 10 (No-Face)": 2}
    assert records[3].path == os.path.join(folder, "Manually_Annotated_Images", "7", "3.png")
    assert records[0].box == (10, 5, 20, 20) and records[0].va == (0.5, -0.2)
    faces = read_faces("AffectNet", records, dropped)
    assert faces.crops == {"box": 8, "detected": 0, "centre": 0}
    # the crop is the box widened by CROP_MARGIN: white in the middle, black at the corners
    assert faces.images.shape == (8, 48, 48)
    assert faces.images[:, 24, 24].min() == 255 and faces.images[:, 0, 0].max() == 0
    white = (faces.images[0] > 127).mean()
    assert white == pytest.approx(1 / (1 + 2 * CROP_MARGIN) ** 2, abs=0.03)
    assert faces.summary()["per_class"] == dict.fromkeys(FER_CLASSES, 1)


def test_affectnet_csv_errors_name_the_row(tmp_path):
    folder = str(tmp_path)
    rows = affectnet_rows(folder, [1, 2])
    rows[1][6] = "happy"
    path = write_affectnet_csv(folder, rows)
    with pytest.raises(DatasetError, match=rf"{path}, row 3: expression must be an integer, got 'happy'"):
        affectnet_records(folder)
    rows[1][6], rows[1][3] = "2", "0"
    write_affectnet_csv(folder, rows)
    with pytest.raises(DatasetError, match=r"row 3: face box \(10, 5, 0, 20\) has no area"):
        affectnet_records(folder)


def test_affectnet_csv_ratings(tmp_path):
    """Valence and arousal in [-1, 1]; AffectNet's -2, or an empty field, for an image without a rating; an image has
    one only where both are given; any other value is refused naming the row and the column."""
    folder = str(tmp_path)
    rows = affectnet_rows(folder, [1, 2, 3, 4, 8])
    rows[1][7:9] = ["-2", "-2"]
    rows[2][7:9] = ["", "0.3"]
    rows[3][7:9] = ["-1", "1.0"]
    write_affectnet_csv(folder, rows)
    records, _ = affectnet_records(folder)
    assert [r.va for r in records] == [(0.5, -0.2), None, None, (-1.0, 1.0)]
    faces = read_faces("AffectNet", records, {})
    np.testing.assert_array_equal(faces.va, [[0.5, -0.2], [np.nan, np.nan], [np.nan, np.nan], [-1, 1]])
    assert faces.summary()["rated_valence_arousal"] == 2
    for value in ("1.01", "nan", "high"):
        rows[2][7] = value
        path = write_affectnet_csv(folder, rows)
        with pytest.raises(DatasetError, match=rf"{path}, row 4: valence must lie in \[-1, 1\] \(or be empty, or -2, "
                                               rf"for an image without a rating\), got '{value}'"):
            affectnet_records(folder)
    unrated = [row[:7] for row in rows[:2]]  # a CSV of its own whose header names no valence and arousal
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([AFFECTNET_COLUMNS[:7], *unrated])
    records, _ = affectnet_records(folder)
    assert len(records) == 2 and all(r.va is None for r in records)
    assert read_faces("AffectNet", records, {}).va is None


def test_affectnet_csv_saved_by_a_spreadsheet(tmp_path):
    """A byte-order mark before the header and a blank line at the end, as spreadsheet programs write them."""
    folder = str(tmp_path)
    path = write_affectnet_csv(folder, affectnet_rows(folder, [1, 2, 8]))
    with open(path, "rb") as handle:
        text = handle.read()
    with open(path, "wb") as handle:
        handle.write(b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n") + b"\r\n")
    records, dropped = affectnet_records(folder)
    assert [r.label for r in records] == [1, 3] and dropped == {"expression 8 (None)": 1}


@pytest.mark.parametrize("content,message", [
    (b"path,label\na.png,happy\n\xff\xfe.png,sad\n",
     r"faces.csv: not UTF-8 text after line \d+ \(invalid start byte\)"),
    (b'path,label\n"a.png,happy\n', r"faces.csv, line 2: not valid CSV \(unexpected end of data\)"),
    (b'path,label\n"a".png,happy\n', r"faces.csv, line 2: not valid CSV \(',' expected after '\"'\)"),
])
def test_text_that_is_not_utf8_csv_is_named(tmp_path, content, message):
    path = tmp_path / "faces.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        manifest_records(str(path))


def test_affectnet_class_folders(tmp_path):
    folder = str(tmp_path)
    frame, _ = frame_with_face(0)
    for name, count in (("happy", 2), ("Sad", 1), ("3", 1), ("none", 2)):
        for i in range(count):
            save(os.path.join(folder, name, f"{i}.jpg"), frame)
    with open(os.path.join(folder, "happy", "notes.txt"), "w") as handle:
        handle.write("not an image")
    records, dropped = affectnet_records(folder)
    labels = sorted(FER_CLASSES[r.label] for r in records)
    assert labels == ["happiness", "happiness", "sadness", "surprise"]  # folder 3 is AffectNet's Surprise
    assert dropped == {"folder none/": 2}
    faces = read_faces("AffectNet", records, dropped)
    assert faces.crops == {"box": 0, "detected": 4, "centre": 0}
    assert faces.va is None and faces.summary()["rated_valence_arousal"] == 0


def write_face_crop_set(folder, codes, frame):
    """AffectNet's face-crop release: images/<n>.jpg and annotations/<n>_exp.npy, for n, code in codes.items()
    (code None: an image without its annotation), with valence n / 100 in _val.npy and arousal -0.5 in _aro.npy.
    Values are stored as text for even n, as numbers for odd n."""
    os.makedirs(folder / "annotations")
    for n, code in codes.items():
        save(str(folder / "images" / f"{n}.jpg"), frame)
        if code is not None:
            for kind, value in (("exp", code), ("val", n / 100), ("aro", -0.5)):
                np.save(folder / "annotations" / f"{n}_{kind}.npy", np.array(str(value) if n % 2 == 0 else value))


def test_affectnet_face_crop_release(tmp_path):
    frame, _ = frame_with_face(0)
    codes = {0: 1, 1: 1, 2: 3, 10: 7, 11: 9, 12: None}  # 9: Uncertain, dropped; 12: no annotation
    write_face_crop_set(tmp_path / "val_set", codes, frame)
    write_face_crop_set(tmp_path / "train_set", {0: 0}, frame)
    records, dropped = affectnet_records(str(tmp_path))
    assert [(os.path.basename(r.path), FER_CLASSES[r.label]) for r in records] == [
        ("0.jpg", "happiness"), ("1.jpg", "happiness"), ("2.jpg", "surprise"), ("10.jpg", "contempt")]
    assert records[0].origin == str(tmp_path / "val_set" / "annotations" / "0_exp.npy") and records[0].box is None
    assert dropped == {"expression 9 (Uncertain)": 1, "image without an _exp.npy annotation": 1}
    assert [FER_CLASSES[r.label] for r in affectnet_records(str(tmp_path), "training")[0]] == ["neutral"]
    assert len(affectnet_records(str(tmp_path / "val_set"))[0]) == 4  # the set's own folder serves too
    assert [r.va for r in records] == [(0.0, -0.5), (0.01, -0.5), (0.02, -0.5), (0.1, -0.5)]
    faces = read_faces("AffectNet", records, dropped)
    assert faces.labels.tolist() == [1, 1, 2, 7] and faces.crops["detected"] == 4
    assert faces.va.tolist() == [[0.0, -0.5], [0.01, -0.5], [0.02, -0.5], [0.1, -0.5]]
    os.remove(tmp_path / "val_set" / "annotations" / "2_aro.npy")  # a rating needs both files
    np.save(tmp_path / "val_set" / "annotations" / "10_val.npy", np.array("-2"))  # AffectNet's mark for none
    assert [r.va for r in affectnet_records(str(tmp_path))[0]] == [(0.0, -0.5), (0.01, -0.5), None, None]


@pytest.mark.parametrize("kind,content,message", [
    ("exp", b"not numpy", r"2_exp.npy: not a readable .npy file"),
    ("exp", np.array([1, 2]), r"2_exp.npy: 2 values, expected one expression code"),
    ("exp", np.array("happy"), r"2_exp.npy: the expression code must be an integer, got 'happy'"),
    ("val", np.array([0.1, 0.2]), r"2_val.npy: 2 values, expected one valence"),
    ("aro", np.array("high"), r"2_aro.npy: arousal must lie in \[-1, 1\] \(or be empty, or -2, for an image without "
                              r"a rating\), got 'high'"),
    ("val", np.array(1.5), r"2_val.npy: valence must lie in \[-1, 1\] .*, got '1.5'"),
])
def test_affectnet_face_crop_annotation_errors_name_the_file(tmp_path, kind, content, message):
    frame, _ = frame_with_face(0)
    write_face_crop_set(tmp_path / "val_set", {1: 1, 2: 3}, frame)
    path = tmp_path / "val_set" / "annotations" / f"2_{kind}.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    with pytest.raises(DatasetError, match=message):
        affectnet_records(str(tmp_path))
    path.unlink()
    (tmp_path / "val_set" / "annotations" / "3_exp.npy").write_bytes((tmp_path / "val_set" / "annotations" /
                                                                     "1_exp.npy").read_bytes())
    records, _ = affectnet_records(str(tmp_path))
    with pytest.raises(DatasetError, match=r"3.jpg \(listed in .*3_exp.npy\): missing"):
        read_faces("AffectNet", records, {})


def test_affectnet_class_folders_under_split_folders(tmp_path):
    frame, _ = frame_with_face(0)
    for split, classes in (("train", ("0", "1")), ("val", ("2",)), ("test", ("3",))):
        for name in classes:
            save(str(tmp_path / split / name / "a.jpg"), frame)
    assert [FER_CLASSES[r.label] for r in affectnet_records(str(tmp_path))[0]] == ["sadness"]
    assert [FER_CLASSES[r.label] for r in affectnet_records(str(tmp_path), "training")[0]] == ["neutral", "happiness"]


def test_affectnet_folder_of_nothing_is_refused(tmp_path):
    os.makedirs(tmp_path / "misc")
    with pytest.raises(DatasetError, match=r"expected an AffectNet folder \(no validation.csv, no val_set/ found\): "
                                           r"subfolders named by class .*found \['misc'\]"):
        affectnet_records(str(tmp_path))


def write_sequence(root, subject, sequence, frames, code=None):
    frame, _ = frame_with_face(hash((subject, sequence)) % 1000)
    for f in range(1, frames + 1):
        save(os.path.join(root, "cohn-kanade-images", subject, sequence, f"{subject}_{sequence}_{f:08d}.png"), frame)
    if code is not None:
        folder = os.path.join(root, "Emotion", subject, sequence)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{subject}_{sequence}_{frames:08d}_emotion.txt"), "w") as handle:
            handle.write(f"   {code}\n")


def test_ckplus_frame_rule_and_codes(tmp_path):
    root = str(tmp_path)
    write_sequence(root, "S005", "001", 6, "5.0000000e+00")   # happy: frame 1 neutral, frames 4-6 happy
    write_sequence(root, "S005", "002", 3, "2.0000000e+00")   # contempt, too short for a neutral frame
    write_sequence(root, "S010", "001", 5)                     # unlabelled
    write_sequence(root, "S011", "004", 5, "9.0000000e+00")   # not a CK+ code
    records, dropped = ckplus_records(root)
    names = [(os.path.basename(r.path), FER_CLASSES[r.label]) for r in records]
    assert names == [("S005_001_00000001.png", "neutral"), ("S005_001_00000004.png", "happiness"),
                     ("S005_001_00000005.png", "happiness"), ("S005_001_00000006.png", "happiness"),
                     ("S005_002_00000001.png", "contempt"), ("S005_002_00000002.png", "contempt"),
                     ("S005_002_00000003.png", "contempt")]
    assert dropped == {"sequence without an emotion label": 1, "emotion code 9 (unknown code)": 1}
    assert {r.group for r in records} == {"S005"}  # a subject's frames, of all its sequences, go together
    faces = read_faces("CK+", records, dropped, workers=3)
    assert faces.crops["detected"] == 7 and len(faces.labels) == 7
    assert faces.groups == ["S005"] * 7 and faces.summary()["groups"] == 1
    serial = read_faces("CK+", records, dropped, workers=1)  # threads change nothing, order included
    np.testing.assert_array_equal(serial.images, faces.images)
    assert serial.paths == faces.paths == [r.path for r in records]


def test_ckplus_bad_emotion_file_is_named(tmp_path):
    root = str(tmp_path)
    write_sequence(root, "S005", "001", 4, "happy")
    with pytest.raises(DatasetError, match=r"S005_001_00000004_emotion.txt, row 1: the emotion code must be an "
                                           r"integer, got 'happy'"):
        ckplus_records(root)
    label = os.path.join(root, "Emotion", "S005", "001", "S005_001_00000004_emotion.txt")
    with open(label, "wb") as handle:
        handle.write(b"   5.0\xff\n")  # not text
    with pytest.raises(DatasetError, match=r"S005_001_00000004_emotion.txt, row 1: the emotion code must be an "
                                           r"integer, got '5.0\ufffd'"):
        ckplus_records(root)


def test_ckplus_face_crops_in_class_folders(tmp_path):
    face = frame_with_face(2)[0][50:150, 80:180]
    for name, count in (("anger", 2), ("happy", 1), ("7", 1), ("0", 1)):  # 7: CK+'s surprise; 0: no CK+ code
        for i in range(count):
            save(str(tmp_path / name / f"S{5 + i:03d}_001_0000001{i}.png"), face)
    save(str(tmp_path / "happy" / "renamed.png"), face)  # a name CK+ did not give: the image alone
    records, dropped = ckplus_records(str(tmp_path))
    assert sorted(FER_CLASSES[r.label] for r in records) == ["anger", "anger", "happiness", "happiness", "surprise"]
    assert dropped == {"folder 0/": 1}
    assert sorted((os.path.basename(r.path), r.group) for r in records) == [
        ("S005_001_00000010.png", "S005"), ("S005_001_00000010.png", "S005"), ("S005_001_00000010.png", "S005"),
        ("S006_001_00000011.png", "S006"), ("renamed.png", None)]
    faces = read_faces("CK+48", records, dropped)
    assert faces.summary()["groups"] == 3  # S005, S006, and renamed.png on its own
    os.makedirs(tmp_path / "empty" / "misc")
    with pytest.raises(DatasetError, match=r"empty: expected a CK\+ folder \(cohn-kanade-images/ with Emotion/\), "
                                           r"or class folders: .*found \['misc'\]"):
        ckplus_records(str(tmp_path / "empty"))


def test_ckplus_needs_both_folders(tmp_path):
    os.makedirs(tmp_path / "cohn-kanade-images")
    with pytest.raises(DatasetError, match=r"no CK\+ Emotion folder \(looked for Emotion, Emotion_labels/Emotion\)"):
        ckplus_records(str(tmp_path))


def test_manifest_labels_paths_and_boxes(tmp_path):
    path = tmp_path / "faces.csv"
    path.write_text("\ufeffPath,Label,x,y,width,height,Group\n"  # with the byte-order mark of a "UTF-8 CSV"
                    "a.png,happy,,,,,p1\n"
                    "/abs/b.png,3,1,2,30,40, p1 \n"
                    "sub/c.png,Angry,,,,,\n"
                    "d.png,confused,,,,,p2\n"
                    "e.png,8,,,,,p2\n"
                    "\n", encoding="utf-8")
    records, dropped = manifest_records(str(path))
    assert [(r.path, r.label, r.box, r.group) for r in records] == [(str(tmp_path / "a.png"), 1, None, "p1"),
                                                                    ("/abs/b.png", 3, (1, 2, 30, 40), "p1"),
                                                                    (str(tmp_path / "sub" / "c.png"), 4, None, None)]
    assert dropped == {"label 'confused' (not a FERPlus class)": 1, "label '8' (not a FERPlus class)": 1}


def test_manifest_ratings(tmp_path):
    path = tmp_path / "faces.csv"
    path.write_text("path,label,Valence,arousal\na.png,happy,0.6,0.3\nb.png,sad,,\nc.png,anger,-0.6,-2\n")
    assert [r.va for r in manifest_records(str(path))[0]] == [(0.6, 0.3), None, None]
    path.write_text("path,label,valence,arousal\na.png,happy,0.6,0.3\nc.png,anger,-0.6,2\n")
    with pytest.raises(DatasetError, match=r"faces.csv, row 3: arousal must lie in \[-1, 1\] .*, got '2'"):
        manifest_records(str(path))
    path.write_text("path,label,valence\na.png,happy,0.6\n")
    with pytest.raises(DatasetError, match=r"faces.csv: a rating needs both columns valence and arousal"):
        manifest_records(str(path))


def test_manifest_paths_keep_spaces_that_are_part_of_a_file_name(tmp_path):
    """A name may end in a space; spaces around a field that names no file are CSV padding ("a.png, happy")."""
    for name in ("face .png", "b.png"):
        save(str(tmp_path / name), np.zeros((30, 30), np.uint8))
    path = tmp_path / "faces.csv"
    path.write_text("path,label\nface .png,happy\n b.png , sad\n")
    assert [(r.path, r.label) for r in manifest_records(str(path))[0]] == [(str(tmp_path / "face .png"), 1),
                                                                           (str(tmp_path / "b.png"), 3)]


def test_manifest_paths_written_on_windows_are_named(tmp_path):
    save(str(tmp_path / "images" / "a.png"), np.zeros((30, 30), np.uint8))
    path = tmp_path / "faces.csv"
    path.write_text("path,label\nimages/a.png,happy\nimages\\a.png,sad\n")
    with pytest.raises(DatasetError, match=r"faces.csv, row 3: no file 'images\\\\a.png', whose backslashes look "
                                           r"like a Windows path; write the manifest's paths with /"):
        manifest_records(str(path))


def test_manifest_header_is_checked(tmp_path):
    path = tmp_path / "faces.csv"
    with pytest.raises(DatasetError, match=r"faces.csv: no such file; expected a CSV with an image path and a label "
                                           r"column"):
        manifest_records(str(path))
    path.write_text("file,emotion\na.png,happy\n")
    with pytest.raises(DatasetError, match=r"faces.csv: the header \['file', 'emotion'\] names no label column; "
                                           r"accepted: paths path, image_path, img, file, filepath, filename; class "
                                           r"names label_name, class_name, label_str; indices label, label_id, cls, "
                                           r"class, target, y$"):
        manifest_records(str(path))
    path.write_text("picture,label\na.png,happy\n")
    with pytest.raises(DatasetError, match=r"names no image path column; accepted: paths path, image_path"):
        manifest_records(str(path))


@pytest.mark.parametrize("header, rows", [
    ("image_path,label_name", ["a.png,happiness", "b.png,Angry"]),
    ("filepath,class_name,split", ["a.png,happy,test", "b.png,anger,test"]),
    ("filename,label_str", ["a.png,HAPPY", "b.png,angry"]),
    ("img,cls", ["a.png,1", "b.png,4"]),  # an index in FERPlus's order
    ("file,y,label_name", ["a.png,9,happiness", "b.png,9,anger"]),  # a name column goes before an index column
])
def test_manifest_headers_of_the_papers_release(tmp_path, header, rows):
    path = tmp_path / "release.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    assert [(os.path.basename(r.path), r.label) for r in manifest_records(str(path))[0]] == [("a.png", 1),
                                                                                            ("b.png", 4)]


@pytest.mark.parametrize("mapping", [{"0": "anger", "1": "happy", "2": "neutral"},
                                     {"anger": 0, "happiness": 1, "neutral": 2}])
def test_index_labels_through_a_class_map(tmp_path, mapping):
    class_map = tmp_path / "classes.json"
    class_map.write_text(json.dumps(mapping))
    path = tmp_path / "ckplus.csv"
    path.write_text("image_path,label_id\na.png,0\nb.png,01\nc.png,2\nd.png,5\n")
    records, dropped = manifest_records(str(path), read_class_map(str(class_map)))
    assert [r.label for r in records] == [4, 1, 0]  # anger, happiness, neutral in FERPlus's order
    assert dropped == {"label '5' (not in --class-map)": 1}
    path.write_text("image_path,label_name\na.png,anger\n")
    with pytest.raises(DatasetError, match=r"--class-map maps index labels, and this manifest's labels are class names "
                                           r"\(column label_name\); leave --class-map out"):
        manifest_records(str(path), read_class_map(str(class_map)))


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", r"expected a JSON object such as"),
    ('{"0": "joy"}', r"entry '0': 'joy' does not pair an integer index with a FERPlus class name"),
    ('{"0": "anger", "00": "fear"}', r"index 0 is mapped twice"),
    ("{not json", r"not a readable JSON file"),
])
def test_a_class_map_that_cannot_be_one_is_named(tmp_path, content, message):
    class_map = tmp_path / "classes.json"
    class_map.write_text(content)
    with pytest.raises(DatasetError, match=rf"--class-map .*classes.json: .*{message}"):
        read_class_map(str(class_map))


def test_class_index():
    assert [class_index(v) for v in ("neutral", "HAPPY", " sad ", "7", "fearful", "8", "-1", "joy", "²")] == \
        [0, 1, 3, 7, 6, None, None, None, None]  # "²" is a digit to Python, but no number int() reads


def test_missing_and_corrupt_images_stop_the_run_or_are_counted(tmp_path):
    frame, _ = frame_with_face(1)
    save(str(tmp_path / "good.png"), frame)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    path = tmp_path / "faces.csv"
    path.write_text("path,label\ngood.png,happy\ncorrupt.png,sad\nmissing.png,fear\n")
    records, dropped = manifest_records(str(path))
    with pytest.raises(DatasetError, match=rf"corrupt.png \(listed in {path}, row 3\): unreadable .*--skip-unreadable"):
        read_faces("faces", records, dropped)
    with pytest.raises(DatasetError, match=rf"missing.png \(listed in {path}, row 4\): missing"):
        read_faces("faces", records[::2], dropped)
    faces = read_faces("faces", records, dropped, skip_unreadable=True)
    assert faces.labels.tolist() == [1]
    assert faces.unreadable == [str(tmp_path / "corrupt.png"), str(tmp_path / "missing.png")]
    assert faces.summary()["unreadable"]["count"] == 2
    with pytest.raises(DatasetError, match=r"^faces: none of its 2 images could be read$"):
        read_faces("faces", records[1:], dropped, skip_unreadable=True)


def test_a_set_with_no_usable_label_says_what_was_dropped(tmp_path):
    path = tmp_path / "faces.csv"
    path.write_text("path,label\na.png,bored\nb.png,bored\nc.png,9\n")
    with pytest.raises(DatasetError, match=rf"^{path}: no row with a FERPlus label; dropped: label 'bored' \(not a "
                                           r"FERPlus class\): 2; label '9' \(not a FERPlus class\): 1$"):
        manifest_records(str(path))
    path.write_text("path,label\n")
    with pytest.raises(DatasetError, match=rf"^{path}: no row with a FERPlus label$"):
        manifest_records(str(path))
    folder = str(tmp_path)
    write_affectnet_csv(folder, affectnet_rows(folder, [8, 10, 10]))
    records, dropped = affectnet_records(folder)
    with pytest.raises(DatasetError, match=r"^AffectNet: no image with a FERPlus label; dropped: expression 8 "
                                           r"\(None\): 1; expression 10 \(No-Face\): 2$"):
        read_faces("AffectNet", records, dropped)
    root = str(tmp_path / "ck")
    write_sequence(root, "S010", "001", 5)
    write_sequence(root, "S011", "004", 5, "9.0000000e+00")
    with pytest.raises(DatasetError, match=r"no labelled CK\+ sequence found under .*; dropped: sequence without an "
                                           r"emotion label: 1; emotion code 9 \(unknown code\): 1$"):
        ckplus_records(root)


def test_box_outside_the_image_is_refused(tmp_path):
    save(str(tmp_path / "a.png"), np.zeros((30, 30), np.uint8))
    path = tmp_path / "faces.csv"
    path.write_text("path,label,x,y,width,height\na.png,happy,40,0,10,10\n")
    records, dropped = manifest_records(str(path))
    with pytest.raises(DatasetError, match=r"row 2: face box \(40, 0, 10, 10\) lies outside the 30 x 30 image"):
        read_faces("faces", records, dropped)


def test_detection_finds_the_placed_face(cropper):
    hits = 0
    for seed in range(10):
        frame, (x, y, side, _) = frame_with_face(seed)
        crop = cropper.crop(frame)
        if crop.how != "detected":
            continue
        bx, by, bw, bh = crop.box
        overlap = max(0, min(x + side, bx + bw) - max(x, bx)) * max(0, min(y + side, by + bh) - max(y, by))
        assert overlap / (bw * bh) > 0.9  # the detection lies on the face
        hits += 1
    assert hits >= 9


def test_a_photo_stored_sideways_is_turned_upright_unless_a_box_refers_to_its_pixels(tmp_path):
    """Phones store a photo taken sideways as it was shot, with an EXIF orientation that says how to turn it."""
    frames = [frame_with_face(seed)[0] for seed in range(6)]
    rows = ["path,label,x,y,width,height"]
    for i, frame in enumerate(frames):
        orientation = Image.Exif()
        orientation[0x0112] = 6  # shown turned 90 degrees clockwise
        Image.fromarray(np.rot90(frame)).save(tmp_path / f"{i}.png", exif=orientation)
        rows += [f"{i}.png,happy,,,,", f"{i}.png,happy,0,0,10,20"]
    (tmp_path / "faces.csv").write_text("\n".join(rows) + "\n")
    records, dropped = manifest_records(str(tmp_path / "faces.csv"))
    faces = read_faces("sideways", records, dropped)
    assert faces.crops == {"box": 6, "detected": 6, "centre": 0}
    # the box (0, 0, 10, 20) is read off the pixels as stored, unturned
    np.testing.assert_array_equal(faces.images[1], cut(np.rot90(frames[0]), (0, 0, 10, 20)))


def test_no_face_falls_back_to_the_centre_square(cropper):
    blank = np.full((60, 100), 128, np.uint8)
    blank[:, 20:80] = 200
    crop = cropper.crop(blank)
    assert crop.how == "centre" and crop.box == (20, 0, 60, 60)
    assert crop.face.shape == (48, 48)


def test_cut_repeats_the_edge_beyond_the_image():
    image = np.arange(100, dtype=np.uint8).reshape(10, 10)
    face = cut(image, (0, 0, 10, 10), margin=0.5, side=20)  # twice the image, centred on it
    assert face.shape == (20, 20)
    assert face[0, 0] == image[0, 0] and face[-1, -1] == image[-1, -1]
    np.testing.assert_array_equal(cut(image, (0, 0, 10, 10), margin=0, side=10), image)


def test_the_largest_face_comes_first(cropper):
    rng = np.random.default_rng(5)
    small, _ = place_face(rng, draw_face(rng, EXPRESSIONS["neutral"], "ckplus"), (120, 120), 80, "ckplus")
    large, _ = place_face(rng, draw_face(rng, EXPRESSIONS["neutral"], "ckplus"), (160, 160), 140, "ckplus")
    frame = np.full((170, 300), 50, np.uint8)
    frame[5:125, 0:120], frame[5:165, 135:295] = small, large
    faces = cropper.faces(frame)
    assert len(faces) == 2 and [crop.how for crop in faces] == ["detected", "detected"]
    assert faces[0].box[0] >= 135 and faces[1].box[0] < 120  # the large face, on the right, first
    assert cropper.crop(frame).box == faces[0].box
