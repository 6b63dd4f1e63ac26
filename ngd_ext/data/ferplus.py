"""FERPlus (SPEC section 6): the vote tables, the official label rule, and the images in either real layout.

- `fer2013.csv` (emotion, pixels, Usage) joined *by row position* with `fer2013new.csv` (Usage, Image name,
  votes for neutral ... contempt, unknown, NF); a row of fer2013new.csv with no image name was dropped by
  FERPlus and is skipped.
- The generated folders `FER2013Train/`, `FER2013Valid/`, `FER2013Test/`, each with `label.csv` (image name,
  face box, the ten vote counts) beside the PNG images.

The official majority rule: votes of 1 are zeroed; an image is kept only if its top category holds more than
half of the remaining votes, and dropped when that category is unknown or NF. Valid and test always use it.
"""

import glob
import hashlib
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ngd_ext.artifacts import atomic_path, package_versions, read_cache_entry, sha256_file
from ngd_ext.data import files as image_decoder
from ngd_ext.data.files import read_rows
from ngd_ext.emotions import FER_CLASSES

VOTE_COLUMNS = FER_CLASSES + ("unknown", "NF")
SPLITS = ("train", "valid", "test")
USAGE_SPLIT = {"Training": "train", "PublicTest": "valid", "PrivateTest": "test"}
FOLDER_SPLIT = {"train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
IMAGE_SIDE = 48
ANNOTATORS = 10


class FerPlusError(ValueError):
    """A FERPlus file that does not have the official structure; the message names the file and row."""


def majority_label(votes):
    """The class index of the official majority rule, or None when the image is dropped."""
    kept = np.where(np.asarray(votes, dtype=np.float64) <= 1.0, 0.0, votes)
    total = kept.sum()
    top = int(np.argmax(kept))
    if total == 0 or kept[top] <= 0.5 * total or top >= len(FER_CLASSES):
        return None
    return top


def probability_label(votes):
    """The official probability target over the 8 classes (votes of 1 zeroed, unknown and NF removed), or
    None when the image is dropped (its top category is unknown or NF, or no vote is left)."""
    kept = np.where(np.asarray(votes, dtype=np.float64) <= 1.0, 0.0, votes)
    if kept.sum() == 0 or int(np.argmax(kept)) >= len(FER_CLASSES):
        return None
    emotions = kept[: len(FER_CLASSES)]
    return emotions / emotions.sum()


def _votes(values, path, row):
    try:
        votes = np.array([int(value) for value in values], dtype=np.int64)
    except ValueError:
        raise FerPlusError(f"{path}, row {row}: vote counts must be integers, got {values}") from None
    if len(votes) != len(VOTE_COLUMNS) or (votes < 0).any():
        raise FerPlusError(f"{path}, row {row}: expected {len(VOTE_COLUMNS)} non-negative vote counts "
                           f"({', '.join(VOTE_COLUMNS)}), got {values}")
    # Ten annotators labelled each image; the official table has one image (fer0010406.png) with nine votes.
    if not 1 <= votes.sum() <= ANNOTATORS:
        raise FerPlusError(f"{path}, row {row}: the votes sum to {votes.sum()}; FERPlus images have at most "
                           f"{ANNOTATORS} annotators")
    return votes


@dataclass
class VoteRow:
    split: str
    name: str       # the image name, e.g. fer0000123.png
    position: int   # row position in fer2013.csv (or in the split's label.csv)
    votes: np.ndarray


def read_fer2013new(path):
    """The rows of fer2013new.csv that name an image, with their split and row position."""
    rows = []
    reader = read_rows(path, FerPlusError)
    header = next(reader, None)
    if header is None:
        raise FerPlusError(f"{path}: the file is empty; expected FERPlus's votes under the header Usage, Image name, "
                           f"{', '.join(VOTE_COLUMNS)}")
    if tuple(header[2:]) != VOTE_COLUMNS or header[:2] != ["Usage", "Image name"]:
        raise FerPlusError(f"{path}: header {header} is not Usage, Image name, {', '.join(VOTE_COLUMNS)}")
    for position, fields in enumerate(reader):
        row = position + 2
        if len(fields) != 2 + len(VOTE_COLUMNS):
            raise FerPlusError(f"{path}, row {row}: {len(fields)} fields, expected {2 + len(VOTE_COLUMNS)}")
        if fields[0] not in USAGE_SPLIT:
            raise FerPlusError(f"{path}, row {row}: Usage {fields[0]!r} is not one of {list(USAGE_SPLIT)}")
        if not fields[1]:
            continue  # an image FERPlus dropped
        rows.append(VoteRow(USAGE_SPLIT[fields[0]], fields[1], position, _votes(fields[2:], path, row)))
    return rows


def read_label_csv(path, split):
    """The rows of a generated FER2013<Split>/label.csv: image name, face box, the ten vote counts."""
    rows = []
    for position, fields in enumerate(read_rows(path, FerPlusError)):
        if len(fields) != 2 + len(VOTE_COLUMNS):
            raise FerPlusError(f"{path}, row {position + 1}: {len(fields)} fields, expected image name, face "
                               f"box and {len(VOTE_COLUMNS)} vote counts")
        rows.append(VoteRow(split, fields[0], position, _votes(fields[2:], path, position + 1)))
    return rows


def layout(folder, images=True):
    """'csv' for fer2013.csv + fer2013new.csv, 'folders' for FER2013{Train,Valid,Test}/label.csv; a folder with
    neither is a FerPlusError that names what is missing. images=False: only the votes are wanted (fer2013new.csv
    alone will do)."""
    expected = "fer2013.csv + fer2013new.csv, or FER2013Train/, FER2013Valid/ and FER2013Test/ with their label.csv"
    if not os.path.isdir(folder):
        raise FerPlusError(f"{folder}: not a folder; expected a FERPlus folder ({expected})")
    if os.path.isfile(os.path.join(folder, "fer2013new.csv")):
        if images and not os.path.isfile(os.path.join(folder, "fer2013.csv")):
            raise FerPlusError(f"{folder}: fer2013new.csv needs fer2013.csv beside it (joined by row position)")
        return "csv"
    missing = [f"{name}/label.csv" for name in FOLDER_SPLIT.values()
               if not os.path.isfile(os.path.join(folder, name, "label.csv"))]
    if missing:
        raise FerPlusError(f"{folder}: neither fer2013new.csv nor {', '.join(missing)} is there; expected {expected}")
    return "folders"


def read_votes(folder):
    """Every named image's vote row, from fer2013new.csv when present, else from the three label.csv files."""
    if layout(folder, images=False) == "csv":
        return read_fer2013new(os.path.join(folder, "fer2013new.csv"))
    return [row for split, name in FOLDER_SPLIT.items()
            for row in read_label_csv(os.path.join(folder, name, "label.csv"), split)]


def read_fer2013_pixels(path):
    """fer2013.csv as (usage per row, uint8 images N x 48 x 48), every row checked. Columns are found by name, so
    Kaggle's icml_face_data.csv (said to hold the same rows; its header "emotion, Usage, pixels") serves as well."""
    usages, images = [], []
    reader = read_rows(path, FerPlusError)
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise FerPlusError(f"{path}: the file is empty; expected FER2013's rows under the header emotion, pixels, "
                           "Usage")
    if sorted(header) != ["Usage", "emotion", "pixels"]:
        raise FerPlusError(f"{path}: header {header} does not name the columns emotion, pixels and Usage")
    pixels_column, usage_column = header.index("pixels"), header.index("Usage")
    for position, fields in enumerate(reader):
        row = position + 2
        if len(fields) != 3:
            raise FerPlusError(f"{path}, row {row}: {len(fields)} fields, expected {', '.join(header)} "
                               "(a truncated row?)")
        try:
            pixels = np.array(fields[pixels_column].split(), dtype=np.int64)
        except ValueError:
            raise FerPlusError(f"{path}, row {row}: pixels must be integers separated by spaces") from None
        if len(pixels) != IMAGE_SIDE * IMAGE_SIDE:
            raise FerPlusError(f"{path}, row {row}: {len(pixels)} pixel values, expected "
                               f"{IMAGE_SIDE * IMAGE_SIDE} (48 x 48)")
        if pixels.min() < 0 or pixels.max() > 255:
            raise FerPlusError(f"{path}, row {row}: pixel values must lie in 0..255")
        usages.append(fields[usage_column].strip())
        images.append(pixels.astype(np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE))
    return usages, np.stack(images) if images else np.empty((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8)


@dataclass
class FerSplit:
    images: np.ndarray   # N x 48 x 48 uint8
    labels: np.ndarray   # N int64 class indices (majority rule)
    targets: np.ndarray  # N x 8 float32 training targets (one-hot for majority, else the vote distribution)
    names: list


def apply_rule(rows, split, training_labels="majority"):
    """Keep the rows of one split that the label rule keeps: (rows, labels, targets)."""
    kept, labels, targets = [], [], []
    for row in rows:
        if row.split != split:
            continue
        label = majority_label(row.votes)
        if split == "train" and training_labels == "probability":
            target = probability_label(row.votes)
            if target is None:
                continue
            label = int(np.argmax(target))
        elif label is None:
            continue
        else:
            target = np.eye(len(FER_CLASSES))[label]
        kept.append(row)
        labels.append(label)
        targets.append(target)
    return kept, np.array(labels, np.int64), np.array(targets, np.float32).reshape(-1, len(FER_CLASSES))


def load_ferplus(folder, training_labels="majority"):
    """{split: FerSplit} from either layout. training_labels: 'majority' or 'probability' (train only)."""
    rows = read_votes(folder)
    pixels_csv = os.path.join(folder, "fer2013.csv")
    usages = images = None
    if layout(folder) == "csv":
        usages, images = read_fer2013_pixels(pixels_csv)
        if len(usages) < max((row.position for row in rows), default=-1) + 1:
            raise FerPlusError(f"{pixels_csv} has {len(usages)} rows but fer2013new.csv has vote rows up to "
                               f"position {max(row.position for row in rows) + 1}; the two are joined by row position")
    splits = {}
    for split in SPLITS:
        kept, labels, targets = apply_rule(rows, split, training_labels)
        if images is not None:
            for row in kept:
                if USAGE_SPLIT.get(usages[row.position]) != split:
                    raise FerPlusError(f"{pixels_csv}, row {row.position + 2}: Usage {usages[row.position]!r} "
                                       f"disagrees with fer2013new.csv's {split} at the same position")
            split_images = images[[row.position for row in kept]]
        else:
            split_images = np.empty((len(kept), IMAGE_SIDE, IMAGE_SIDE), np.uint8)
            for i, row in enumerate(kept):
                path = os.path.join(folder, FOLDER_SPLIT[split], row.name)
                try:
                    grey = image_decoder.read_grey(path, upright=False)
                except OSError as error:
                    raise FerPlusError(f"unreadable FERPlus image: {error}") from error
                split_images[i] = np.asarray(Image.fromarray(grey).resize((IMAGE_SIDE, IMAGE_SIDE)))
        splits[split] = FerSplit(split_images, labels, targets, [row.name for row in kept])
    return splits


def source_files(folder):
    """The files a FERPlus folder's images and labels come from, in a fixed order."""
    if layout(folder) == "csv":
        return [os.path.join(folder, "fer2013.csv"), os.path.join(folder, "fer2013new.csv")]
    files = []
    for name in FOLDER_SPLIT.values():
        files.append(os.path.join(folder, name, "label.csv"))
        files += sorted(glob.glob(os.path.join(folder, name, "*.png")))
    return files


def decoder_fingerprint():
    """What the decoded arrays depend on besides the files and the label rule: the code that reads and decodes them,
    and the packages it calls. A cache entry made by other code is not used."""
    digest = hashlib.sha256()
    for module_file in (__file__, image_decoder.__file__):
        digest.update(sha256_file(module_file).encode())
    digest.update(repr(sorted(package_versions(("numpy", "pillow")).items())).encode())
    return digest.hexdigest()


def load_ferplus_cached(folder, cache_dir, training_labels="majority"):
    """load_ferplus, decoded once: the arrays are cached under cache_dir, for the SHA-256 of every source file, the
    label rule and the decoder (a damaged entry is decoded anew and rewritten). Returns (splits, key), key the
    data's identity: the files and the label rule."""
    digest = hashlib.sha256(training_labels.encode())
    for path in source_files(folder):
        digest.update(os.path.relpath(path, folder).encode() + sha256_file(path).encode())
    key = digest.hexdigest()
    cache = os.path.join(cache_dir, f"ferplus-{key[:16]}-{decoder_fingerprint()[:8]}.npz")
    cached = read_cache_entry(cache, lambda data: {
        split: FerSplit(data[f"{split}_images"], data[f"{split}_labels"], data[f"{split}_targets"],
                        data[f"{split}_names"].tolist()) for split in SPLITS})
    if cached is not None:
        return cached, key
    splits = load_ferplus(folder, training_labels)
    arrays = {}
    for split, data in splits.items():
        arrays.update({f"{split}_images": data.images, f"{split}_labels": data.labels,
                       f"{split}_targets": data.targets, f"{split}_names": np.array(data.names, dtype=str)})
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_path(cache) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
    return splits, key


def data_summary(splits):
    """Image counts per split and class after the label rule."""
    return {split: {"images": int(len(data.labels)),
                    "per_class": {name: int((data.labels == c).sum()) for c, name in enumerate(FER_CLASSES)}}
            for split, data in splits.items()}
