"""Evaluation sets in their real layouts (SPEC section 6), read into FERPlus's class order.

Each reader turns a dataset's files into records (image path, FERPlus label, the dataset's face box if any)
and a count of what it dropped and why; `read_faces` then decodes and crops them (ngd_ext.data.face_crop).

- AffectNet: `training.csv` / `validation.csv` (in the folder or its `Manually_Annotated_file_lists/`, with
  or without the header row) whose `subDirectory_filePath` is relative to `Manually_Annotated_Images/`
  (or the folder itself); expression codes 0-7 remapped explicitly, 8-10 (None, Uncertain, No-Face) and any
  other code dropped and counted; the CSV's face box is used. Or AffectNet's later release of face crops:
  `val_set/` and `train_set/`, each with `images/<n>.jpg` and `annotations/<n>_exp.npy` (the same codes, one per
  file). Or class-named image folders (`happy/`, `Surprise/`, ... or AffectNet's codes `0/` ... `7/`), in the
  folder or in its `val/` (or `train/`); images in other folders are dropped and counted. The CSV's `valence` and
  `arousal` columns, and the face-crop release's `<n>_val.npy` and `<n>_aro.npy`, give each image's rating.
- CK+: `cohn-kanade-images/Sxxx/yyy/*.png` (or `extended-cohn-kanade-images/cohn-kanade-images/`) with
  `Emotion/Sxxx/yyy/*_emotion.txt` (or `Emotion_labels/Emotion/`). A labelled sequence gives its last 3 frames
  its label and its first frame `neutral` (a sequence of 3 frames or fewer gives no neutral frame); sequences
  without an emotion file, and codes outside 1-7, are dropped and counted. Or, with no sequence tree, face crops
  in class folders (`anger/`, `happy/`, ... or CK+'s codes `1/` ... `7/`), as in the CK+48 copies passed around.
  A subject's frames are one group (its `Sxxx` folder, or the `Sxxx_` that begins a crop's file name).
- A manifest: a CSV with a header naming a `path` column (relative to the CSV's folder, or absolute) and a
  `label` column (a class name, e.g. `happy`, or a FERPlus index 0-7), and optionally `x`, `y`, `width`,
  `height` for a face box, `group` (e.g. the person: images of one group are not independent) and `valence`,
  `arousal`; unknown labels are dropped and counted.

Valence and arousal lie in [-1, 1]; an empty field, or AffectNet's -2, means that the image has no rating, and an
image has one only where both are given. Any other value stops the run naming the file and row.

Image files that are missing or cannot be decoded stop the run with a message naming the file and the row
that lists it; with `skip_unreadable` they are counted, listed in the report and left out instead.
"""

import glob
import itertools
import json
import os
import re
import tokenize
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ngd_ext.data.face_crop import HOW, thread_cropper
from ngd_ext.data.files import read_grey, read_rows
from ngd_ext.emotions import (AFFECTNET_CODES, AFFECTNET_UNUSABLE, CKPLUS_CODES, CLASS_ALIASES, FER_CLASSES,
                              VA_DIMENSIONS)
from ngd_ext.runtime import map_in_threads

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
                     "expression", "valence", "arousal")


class DatasetError(ValueError):
    """A dataset file that does not have the expected structure; the message names the file and row."""


@dataclass(frozen=True)
class FaceRecord:
    path: str
    label: int        # FERPlus class index
    box: tuple        # (x, y, width, height) from the dataset, or None: find the face
    origin: str       # where the record was read, for messages: "file, row n"
    group: str = None  # images that are not independent, which a bootstrap draws together (a CK+ subject's frames)
    va: tuple = None   # (valence, arousal) in [-1, 1], where the dataset rates the image


@dataclass
class FaceSet:
    name: str
    images: np.ndarray   # N x 48 x 48 uint8, cropped as in training
    labels: np.ndarray   # N FERPlus class indices
    paths: list
    dropped: dict        # {why: count} of labelled items left out by the label rules
    crops: dict = field(default_factory=dict)     # {how: count}, HOW of ngd_ext.data.face_crop
    unreadable: list = field(default_factory=list)  # image files skipped with skip_unreadable
    groups: list = None  # per image, its FaceRecord.group (or its path, where it has none); None: no groups at all
    va: np.ndarray = None  # N x 2 (valence, arousal), NaN for an image without a rating; None: no image has one

    def summary(self):
        return {"images": int(len(self.labels)), "groups": None if self.groups is None else len(set(self.groups)),
                "rated_valence_arousal": 0 if self.va is None else int((~np.isnan(self.va[:, 0])).sum()),
                "per_class": {name: int((self.labels == c).sum()) for c, name in enumerate(FER_CLASSES)},
                "dropped": dict(self.dropped), "crops": dict(self.crops),
                "unreadable": {"count": len(self.unreadable), "files": self.unreadable[:20]}}


def class_index(value):
    """The FERPlus class of a label written as a class name (any alias, any case) or a FERPlus index 0-7;
    None when it is neither."""
    text = str(value).strip()
    if text.isdecimal():
        return int(text) if int(text) < len(FER_CLASSES) else None
    name = CLASS_ALIASES.get(text.lower())
    return FER_CLASSES.index(name) if name else None


def _integer(text, path, row, column):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value != int(value):
        raise DatasetError(f"{path}, row {row}: {column} must be an integer, got {text!r}")
    return int(value)


def _face_box(values, names, path, row):
    """A face box (x, y, width, height) from its four CSV fields (their column names: names), or None where all are
    empty; a box without area is refused naming the row."""
    if not any(value.strip() for value in values):
        return None
    box = tuple(_integer(value, path, row, name) for value, name in zip(values, names))
    if box[2] <= 0 or box[3] <= 0:
        raise DatasetError(f"{path}, row {row}: face box {box} has no area")
    return box


AFFECTNET_NOT_RATED = -2.0  # AffectNet's valence and arousal of an image without a rating (its codes 8-10 have it)


def _rating(text, where, column):
    """A valence or arousal written as text: its value in [-1, 1], or None where there is none (an empty field, or
    AffectNet's -2)."""
    text = str(text).strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value == AFFECTNET_NOT_RATED:
        return None
    if not -1 <= value <= 1:
        raise DatasetError(f"{where}: {column} must lie in [-1, 1] (or be empty, or -2, for an image without a "
                           f"rating), got {text!r}")
    return value


def _rated(valence, arousal):
    """(valence, arousal), or None unless both are given."""
    return None if valence is None or arousal is None else (valence, arousal)


# AffectNet ---------------------------------------------------------------------------------------------------

AFFECTNET_CROP_SETS = {"validation": "val_set", "training": "train_set"}
SPLIT_FOLDERS = {"validation": ("val", "validation", "valid"), "training": ("train", "training")}


def affectnet_records(folder, split="validation"):
    """(records, dropped) of an AffectNet folder: its `<split>.csv` when there is one; else the face-crop release's
    `val_set/` or `train_set/` (or the folder itself, when it is one of them); else class folders."""
    for candidate in (os.path.join(folder, f"{split}.csv"),
                      os.path.join(folder, "Manually_Annotated_file_lists", f"{split}.csv")):
        if os.path.isfile(candidate):
            image_roots = (os.path.join(folder, "Manually_Annotated_Images"),
                           os.path.join(folder, "Manually_Annotated", "Manually_Annotated_Images"))
            image_root = next((root for root in image_roots if os.path.isdir(root)), folder)
            return affectnet_csv_records(candidate, image_root)
    for candidate in (os.path.join(folder, AFFECTNET_CROP_SETS[split]), folder):
        if all(os.path.isdir(os.path.join(candidate, name)) for name in ("images", "annotations")):
            return affectnet_crop_records(candidate)
    # class folders, in the folder or in a subfolder named for the split (copies passed around as train/ and val/)
    split_folder = next((os.path.join(folder, name) for name in SPLIT_FOLDERS[split]
                         if os.path.isdir(os.path.join(folder, name))), folder)
    return class_folder_records(split_folder, AFFECTNET_CODES, f"an AffectNet folder (no {split}.csv, no "
                                                              f"{AFFECTNET_CROP_SETS[split]}/ found)")


def affectnet_csv_records(path, image_root):
    records, dropped = [], Counter()
    rows = ((number, fields) for number, fields in enumerate(read_rows(path, DatasetError), 1)
            if any(field.strip() for field in fields))
    number, first = next(rows, (None, None))
    if first is None:
        raise DatasetError(f"{path}: empty file")
    has_header = first[0] == AFFECTNET_COLUMNS[0]
    if has_header:
        missing = [name for name in AFFECTNET_COLUMNS[:5] + ("expression",) if name not in first]
        if missing:
            raise DatasetError(f"{path}: the header lacks the column(s) {', '.join(missing)}")
        columns = {name: first.index(name) for name in AFFECTNET_COLUMNS if name in first}
    else:  # AffectNet's CSVs are also passed around without their header row: the official column order
        columns = {name: i for i, name in enumerate(AFFECTNET_COLUMNS)}
    body = rows if has_header else itertools.chain([(number, first)], rows)
    rated = all(name in columns for name in VA_DIMENSIONS)  # a header may leave them out
    width = max(columns.values()) + 1
    for number, fields in body:
        if len(fields) < width:
            raise DatasetError(f"{path}, row {number}: {len(fields)} fields, expected AffectNet's "
                               f"{len(AFFECTNET_COLUMNS)} ({', '.join(AFFECTNET_COLUMNS)})")
        code = _integer(fields[columns["expression"]], path, number, "expression")
        if code not in AFFECTNET_CODES:
            dropped[f"expression {code} ({AFFECTNET_UNUSABLE.get(code, 'unknown code')})"] += 1
            continue
        box = _face_box([fields[columns[name]] for name in AFFECTNET_COLUMNS[1:5]], AFFECTNET_COLUMNS[1:5], path,
                        number)
        label = FER_CLASSES.index(AFFECTNET_CODES[code])
        where = f"{path}, row {number}"
        va = _rated(*(_rating(fields[columns[name]], where, name) for name in VA_DIMENSIONS)) if rated else None
        records.append(FaceRecord(os.path.join(image_root, fields[columns["subDirectory_filePath"]]), label, box,
                                  where, va=va))
    return records, dict(dropped)


# What np.load, and taking the value out, raise for a damaged .npy file: its header is parsed as a Python literal,
# and stored text that is not valid UTF-32 makes numpy raise SystemError.
DAMAGED_NPY_ERRORS = (OSError, ValueError, EOFError, SyntaxError, TypeError, SystemError, tokenize.TokenError)


def _npy_value(path, what):
    """The single value in one of the face-crop release's annotation files, stored as text ('1') or as a number."""
    try:
        value = np.load(path, allow_pickle=False)
        stored = value.reshape(()).item() if value.size == 1 else None
    except DAMAGED_NPY_ERRORS as error:
        raise DatasetError(f"{path}: not a readable .npy file ({type(error).__name__}: {error})") from error
    if stored is None:
        raise DatasetError(f"{path}: {value.size} values, expected one {what}")
    return stored


def affectnet_expression_code(path):
    """The expression code in one of the face-crop release's <n>_exp.npy files."""
    stored = _npy_value(path, "expression code")
    try:
        code = float(stored)
    except (TypeError, ValueError):
        code = float("nan")
    if not np.isfinite(code) or code != int(code):
        raise DatasetError(f"{path}: the expression code must be an integer, got {stored!r}")
    return int(code)


def affectnet_crop_records(folder):
    """AffectNet's release of face crops: images/<n>.jpg, each with annotations/<n>_exp.npy, <n>_val.npy and
    <n>_aro.npy (and _lnd.npy, not needed here). The crops hold one face, found as in class folders; an image without
    its _exp.npy is dropped and counted, one without _val.npy or _aro.npy has no rating, and an _exp.npy without its
    image is reported missing when the images are read."""
    records, dropped = [], Counter()
    image_dir, annotation_dir = os.path.join(folder, "images"), os.path.join(folder, "annotations")
    images = {os.path.splitext(name)[0]: os.path.join(image_dir, name) for name in os.listdir(image_dir)
              if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)}
    suffix = "_exp.npy"
    stems = sorted((name[:-len(suffix)] for name in os.listdir(annotation_dir)
                    if name.endswith(suffix) and not name.startswith(".")),
                   key=lambda stem: (not stem.isdecimal(), int(stem) if stem.isdecimal() else 0, stem))  # 2 before 10
    for stem in stems:
        path = os.path.join(annotation_dir, stem + suffix)
        code = affectnet_expression_code(path)
        if code not in AFFECTNET_CODES:
            dropped[f"expression {code} ({AFFECTNET_UNUSABLE.get(code, 'unknown code')})"] += 1
            continue
        image = images.get(stem, os.path.join(image_dir, f"{stem}.jpg"))
        rating_files = [os.path.join(annotation_dir, f"{stem}_{kind}.npy") for kind in ("val", "aro")]
        va = None
        if all(map(os.path.isfile, rating_files)):
            va = _rated(*(_rating(_npy_value(file, name), file, name)
                          for file, name in zip(rating_files, VA_DIMENSIONS)))
        records.append(FaceRecord(image, FER_CLASSES.index(AFFECTNET_CODES[code]), None, path, va=va))
    unannotated = len(set(images) - set(stems))
    if unannotated:
        dropped[f"image without an {suffix} annotation"] = unannotated
    if not stems:
        raise DatasetError(f"{annotation_dir}: no <n>{suffix} annotation files (AffectNet's face-crop release)")
    return records, dict(dropped)


def class_folder_records(folder, codes, expected, group_of=lambda path: None):
    """Images in class-named subfolders: any alias of a FERPlus class, or the dataset's numeric `codes` (AffectNet's
    0-7, CK+'s 1-7). Images under other subfolders are dropped and counted. `expected` names what the folder should
    be, for the error when it holds no such images; `group_of` gives an image's group from its path."""
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: not a folder")
    records, dropped = [], Counter()
    subfolders = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    for name in subfolders:
        files = sorted(path for path in glob.glob(os.path.join(folder, name, "*"))
                       if path.lower().endswith(IMAGE_EXTENSIONS))
        class_name = codes.get(int(name)) if name.isdecimal() else CLASS_ALIASES.get(name.lower())
        if class_name is None:
            if files:
                dropped[f"folder {name}/"] += len(files)
            continue
        label = FER_CLASSES.index(class_name)
        records += [FaceRecord(path, label, None, f"{folder}, class folder {name}/", group_of(path)) for path in files]
    if not records:
        raise DatasetError(f"{folder}: expected {expected}: subfolders named by class ({', '.join(FER_CLASSES)}, or "
                           f"aliases such as happy, sad, angry) holding images; found {subfolders or 'none'}")
    return records, dict(dropped)


# CK+ ---------------------------------------------------------------------------------------------------------

def _first_folder(folder, candidates, what):
    for candidate in candidates:
        path = os.path.join(folder, *candidate)
        if os.path.isdir(path):
            return path
    raise DatasetError(f"{folder}: no {what} folder (looked for {', '.join('/'.join(c) for c in candidates)})")


CKPLUS_IMAGE_FOLDERS = [("cohn-kanade-images",), ("extended-cohn-kanade-images", "cohn-kanade-images")]
CKPLUS_SUBJECT = re.compile(r"(S\d+)_")  # CK+'s frame names begin with the subject: S010_004_00000017.png


def ckplus_subject(path):
    """The CK+ subject whose frame a file is, by its name; None for a name CK+ did not give it."""
    match = CKPLUS_SUBJECT.match(os.path.basename(path))
    return match.group(1) if match else None


def ckplus_records(folder):
    """(records, dropped) of CK+'s sequence tree; or, where the folder has none, of face crops sorted into class
    folders (as in the CK+48 copies passed around, whose labels are those of the sequences' last frames)."""
    if not any(os.path.isdir(os.path.join(folder, *candidate)) for candidate in CKPLUS_IMAGE_FOLDERS):
        return class_folder_records(folder, CKPLUS_CODES, "a CK+ folder (cohn-kanade-images/ with Emotion/), or class "
                                                          "folders", group_of=ckplus_subject)
    images = _first_folder(folder, CKPLUS_IMAGE_FOLDERS, "CK+ image")
    emotions = _first_folder(folder, [("Emotion",), ("Emotion_labels", "Emotion")], "CK+ Emotion")
    records, dropped = [], Counter()
    neutral = FER_CLASSES.index("neutral")
    for emotion_dir in sorted(glob.glob(os.path.join(emotions, "*", "*"))):
        relative = os.path.relpath(emotion_dir, emotions)
        if glob.glob(os.path.join(emotion_dir, "*_emotion.txt")) and not os.path.isdir(os.path.join(images, relative)):
            raise DatasetError(f"{emotion_dir} holds a label but {os.path.join(images, relative)} does not exist")
    for sequence_dir in sorted(glob.glob(os.path.join(images, "*", "*"))):
        frames = sorted(glob.glob(os.path.join(sequence_dir, "*.png")))
        if not frames:
            continue
        relative = os.path.relpath(sequence_dir, images)
        label_files = sorted(glob.glob(os.path.join(emotions, relative, "*_emotion.txt")))
        if not label_files:
            dropped["sequence without an emotion label"] += 1
            continue
        if len(label_files) > 1:
            raise DatasetError(f"{os.path.join(emotions, relative)}: {len(label_files)} emotion files, expected one")
        with open(label_files[0], encoding="ascii", errors="replace") as handle:  # bad bytes reach _integer's message
            code = _integer(handle.read().strip(), label_files[0], 1, "the emotion code")
        if code not in CKPLUS_CODES:
            dropped[f"emotion code {code} (unknown code)"] += 1
            continue
        label = FER_CLASSES.index(CKPLUS_CODES[code])
        subject = relative.split(os.sep)[0]
        if len(frames) > 3:
            records.append(FaceRecord(frames[0], neutral, None, f"{sequence_dir}, first frame", subject))
        records += [FaceRecord(frame, label, None, f"{label_files[0]}, one of the last 3 frames", subject)
                    for frame in frames[-3:]]
    if not records:
        raise DatasetError(f"{folder}: no labelled CK+ sequence found under {images} and {emotions}"
                           + dropped_note(dropped))
    return records, dict(dropped)


# A manifest --------------------------------------------------------------------------------------------------

# The column names a manifest's header may use (SPEC section 6), the paper's own release's among them; the first
# found, in this order, is read.
PATH_COLUMNS = ("path", "image_path", "img", "file", "filepath", "filename")
NAME_COLUMNS = ("label_name", "class_name", "label_str")          # a class name
INDEX_COLUMNS = ("label", "label_id", "cls", "class", "target", "y")  # an index (or a name), through --class-map


def read_class_map(path):
    """--class-map JSON as {index as text: FERPlus class}: {"0": "neutral", ...} or {"neutral": 0, ...}, each name a
    FERPlus class (any alias)."""
    try:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    except (OSError, ValueError) as error:
        raise DatasetError(f"--class-map {path}: not a readable JSON file ({error})") from error
    if not isinstance(entries, dict) or not entries:
        raise DatasetError(f"--class-map {path}: expected a JSON object such as {{\"0\": \"neutral\", ...}} or "
                           "{\"neutral\": 0, ...}")
    mapping = {}
    for key, value in entries.items():
        index, name = (key, value) if _index_key(key) is not None else (value, key)
        label = class_index(name) if _index_key(name) is None else None
        if _index_key(index) is None or label is None:
            raise DatasetError(f"--class-map {path}: entry {key!r}: {value!r} does not pair an integer index with a "
                               f"FERPlus class name ({', '.join(FER_CLASSES)})")
        if _index_key(index) in mapping:
            raise DatasetError(f"--class-map {path}: index {_index_key(index)} is mapped twice")
        mapping[_index_key(index)] = label
    return mapping


def _index_key(value):
    """An integer label as the class map keys it ("007" and 7 alike: "7"), or None for anything else."""
    text = str(value).strip()
    return str(int(text)) if re.fullmatch(r"-?\d+", text) else None


def manifest_columns(header, path, class_map, boxed):
    """(path column, label column, whether labels go through the class map) of a manifest's header; with a face box
    (boxed), its column y is no label."""
    paths = [name for name in PATH_COLUMNS if name in header]
    names = [name for name in NAME_COLUMNS if name in header]
    indices = [name for name in INDEX_COLUMNS if name in header and not (boxed and name == "y")]
    if not paths or not (names or indices):
        raise DatasetError(f"{path}: the header {header} names no {'image path' if not paths else 'label'} column; "
                           f"accepted: paths {', '.join(PATH_COLUMNS)}; class names {', '.join(NAME_COLUMNS)}; "
                           f"indices {', '.join(INDEX_COLUMNS)}")
    if class_map is not None and names:
        raise DatasetError(f"{path}: --class-map maps index labels, and this manifest's labels are class names "
                           f"(column {names[0]}); leave --class-map out")
    label = names[0] if names else indices[0]
    return header.index(paths[0]), header.index(label), class_map is not None


def manifest_records(path, class_map=None):
    """The rows of a manifest CSV (an image path and a label column, optionally a face box x, y, width, height, a
    group and valence and arousal ratings); class_map ({index as text: FERPlus class}) reads index labels."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file; expected a CSV with an image path and a label column")
    base = os.path.dirname(os.path.abspath(path))
    records, dropped = [], Counter()
    rows = read_rows(path, DatasetError)
    header = [name.strip().lower() for name in next(rows, [])]
    boxed = any(name in header for name in ("x", "width", "height"))  # without them, a column y is a label
    box_columns = [header.index(name) for name in ("x", "y", "width", "height") if name in header] if boxed else []
    if boxed and len(box_columns) != 4:
        raise DatasetError(f"{path}: a face box needs all four columns x, y, width, height")
    path_column, label_column, mapped = manifest_columns(header, path, class_map, boxed)
    rating_columns = [header.index(name) for name in VA_DIMENSIONS if name in header]
    if len(rating_columns) == 1:
        raise DatasetError(f"{path}: a rating needs both columns valence and arousal")
    group_column = header.index("group") if "group" in header else None
    for number, fields in enumerate(rows, 2):
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            raise DatasetError(f"{path}, row {number}: {len(fields)} fields, expected {len(header)} "
                               f"({', '.join(header)})")
        label = class_map.get(_index_key(fields[label_column])) if mapped else class_index(fields[label_column])
        if label is None:
            why = "not in --class-map" if mapped else "not a FERPlus class"
            dropped[f"label {fields[label_column].strip()!r} ({why})"] += 1
            continue
        box = _face_box([fields[i] for i in box_columns], [header[i] for i in box_columns], path, number)
        image_path = os.path.join(base, fields[path_column])
        if not os.path.lexists(image_path):  # written as "a.png, 3": the spaces around a field are not its name
            image_path = os.path.join(base, fields[path_column].strip())
        if "\\" in image_path and not os.path.exists(image_path):
            raise DatasetError(f"{path}, row {number}: no file {fields[path_column].strip()!r}, whose backslashes "
                               "look like a Windows path; write the manifest's paths with / (relative to its folder, "
                               "or absolute)")
        group = fields[group_column].strip() if group_column is not None else ""
        where = f"{path}, row {number}"
        va = _rated(*(_rating(fields[i], where, header[i]) for i in rating_columns)) if rating_columns else None
        records.append(FaceRecord(image_path, label, box, where, group or None, va))
    if not records:
        raise DatasetError(f"{path}: no row with a FERPlus label" + dropped_note(dropped))
    return records, dict(dropped)


BOX_COLUMNS = ("path", "x", "y", "width", "height")


def box_records(path, folder):
    """The faces of a boxes CSV (columns BOX_COLUMNS, one row per face; paths relative to folder, or absolute) as
    FaceRecords without labels, for faces that the user's own detector found."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file; expected a CSV with the columns {', '.join(BOX_COLUMNS)}")
    rows = read_rows(path, DatasetError)
    header = [name.strip().lower() for name in next(rows, [])]
    missing = [name for name in BOX_COLUMNS if name not in header]
    if missing:
        raise DatasetError(f"{path}: the header {header} lacks the columns {', '.join(missing)}; expected "
                           f"{', '.join(BOX_COLUMNS)}")
    columns = [header.index(name) for name in BOX_COLUMNS]
    records = []
    for number, fields in enumerate(rows, 2):
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            raise DatasetError(f"{path}, row {number}: {len(fields)} fields, expected {len(header)}")
        image, *box = (fields[i] for i in columns)
        box = _face_box(box, BOX_COLUMNS[1:], path, number)
        if box is None:
            raise DatasetError(f"{path}, row {number}: no face box (x, y, width, height are empty)")
        image_path = os.path.join(folder, image.strip())
        if not os.path.isfile(image_path):
            raise DatasetError(f"{path}, row {number}: no image file {image.strip()!r} in {folder}")
        records.append(FaceRecord(image_path, None, box, f"{path}, row {number}"))
    if not records:
        raise DatasetError(f"{path}: no face box in it")
    return records


# Decoding and cropping ---------------------------------------------------------------------------------------

def crop_record(record):
    """(record, Crop), or (record, OSError) for an image that cannot be read."""
    try:
        grey = read_grey(record.path, upright=record.box is None)
        if grey.size == 0:
            raise OSError(f"{record.path}: an empty image")
    except OSError as error:
        return record, error
    if record.box is not None:
        x, y, width, height = record.box
        if x >= grey.shape[1] or y >= grey.shape[0] or x + width <= 0 or y + height <= 0:
            raise DatasetError(f"{record.origin}: face box {record.box} lies outside the "
                               f"{grey.shape[1]} x {grey.shape[0]} image {record.path}")
    return record, thread_cropper().crop(grey, record.box)


def dropped_note(dropped):
    """The end of an error that says why a set has nothing left: what was dropped, and how often ("; dropped:
    expression 8 (None): 8; expression 9 (Uncertain): 8"), or "" where nothing was."""
    return "; dropped: " + "; ".join(f"{what}: {count}" for what, count in dropped.items()) if dropped else ""


def read_faces(name, records, dropped, skip_unreadable=False, workers=None):
    """Decode and crop every record into a FaceSet."""
    if not records:
        raise DatasetError(f"{name}: no image with a FERPlus label" + dropped_note(dropped))
    images, labels, paths, groups, ratings, unreadable, crops = [], [], [], [], [], [], Counter()
    for record, crop in map_in_threads(crop_record, records, f"reading {name}", workers):
        if isinstance(crop, OSError):
            if not skip_unreadable:
                missing = isinstance(crop, FileNotFoundError)
                raise DatasetError(f"{record.path} (listed in {record.origin}): "
                                   f"{'missing' if missing else 'unreadable'} ({crop}); use --skip-unreadable to "
                                   "count and leave out such files") from crop
            unreadable.append(record.path)
            continue
        crops[crop.how] += 1
        images.append(crop.face)
        labels.append(record.label)
        paths.append(record.path)
        groups.append(record.group)
        ratings.append((np.nan, np.nan) if record.va is None else record.va)
    if not images:
        raise DatasetError(f"{name}: none of its {len(records)} images could be read")
    grouped = any(group is not None for group in groups)
    ratings = np.array(ratings, np.float64)
    return FaceSet(name, np.stack(images), np.array(labels, np.int64), paths, dict(dropped),
                   {how: crops[how] for how in HOW}, unreadable,
                   [path if group is None else group for path, group in zip(paths, groups)] if grouped else None,
                   ratings if not np.isnan(ratings).all() else None)
