"""Prediction and deployment, where only the image model runs: the students' valence/arousal readouts, the faces in a
folder of photos classified into a CSV, and a student exported as a torch.export program that runs with torch alone."""

import csv
import os
import sys
from collections import Counter

import numpy as np
import torch

from ngd_ext import artifacts
from ngd_ext.data.face_crop import CROP_MARGIN, thread_cropper
from ngd_ext.data.faces import IMAGE_EXTENSIONS, box_records, crop_record
from ngd_ext.data.files import read_grey
from ngd_ext.emotions import FER_CLASSES, VA_DIMENSIONS
from ngd_ext.prototypes import grid_centres, load_bank, nearest_prototypes
from ngd_ext.runtime import map_in_threads
from ngd_ext.student_model import ONNX_PACKAGES, export_onnx, export_student, onnx_available, predict

SYNTHETIC_NOTE = "synthetic data: not the paper's numbers"


# Valence and arousal, read out from a student ----------------------------------------------------------------

READOUTS = {"prototype": "the V/A bin of the nearest prototype",
            "class": "the class probabilities over the classes' V/A anchors"}


def class_readout(logits, anchors):
    """Each image's (valence, arousal): its class probabilities' weighted mean of the classes' V/A anchors."""
    return class_probabilities(logits).astype(np.float64) @ np.asarray(anchors, np.float64)


def prototype_readout(embeddings, bank, centres, filled_from):
    """Each image's (valence, arousal): the centre of the V/A bin of its nearest prototype (cosine), as
    prototypes.png counts them. A bin stage 2 filled from a neighbour holds the neighbour's prototype, and stands for
    the neighbour's V/A, where the EEG trials behind that prototype lie."""
    return np.asarray(centres, np.float64)[np.asarray(filled_from)[nearest_prototypes(embeddings, bank)]]


def readouts_of(logits, embeddings, config, prototypes):
    """{readout: N x 2 (valence, arousal)} of a student's images: the class readout, and, given the prototypes (bank,
    centres, filled_from), the prototype readout for a student trained with Proto-KD (nothing trains the projection
    head of the others)."""
    readouts = {}
    if config["proto_weight"] > 0 and prototypes is not None:
        readouts["prototype"] = prototype_readout(embeddings, *prototypes)
    readouts["class"] = class_readout(logits, config["anchors"])
    return readouts


def class_probabilities(logits):
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def readout_columns(readouts):
    """The CSV columns of V/A readouts: valence_from_class, arousal_from_class, ..."""
    return [f"{dimension}_from_{readout}" for readout in readouts for dimension in VA_DIMENSIONS]


def faces_in(path):
    """(path, every face crop in the image), or (path, OSError) for a file that cannot be read."""
    try:
        return path, thread_cropper().faces(read_grey(path, upright=True))
    except OSError as error:
        return path, error


def image_files(folder):
    """(the image files under folder, at any depth, in a fixed order; a Counter of the other files' extensions).
    Hidden files and folders (names that start with a dot: the ._ copies macOS leaves beside every file it copies,
    .thumbnails/) are left out, as glob leaves them."""
    images, others = [], Counter()
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(os.path.join(root, name))
            else:
                others[os.path.splitext(name)[1].lower() or "(no extension)"] += 1
    return sorted(images), others


def prediction_prototypes(stage2_dir, config):
    """The prototypes (bank, centres, filled_from) for the prototype readout in prediction mode, which runs without
    them where it must: None, with a note saying why, where the run has no bank, or not the one the student was
    trained against. A bank that is there is checked against its manifest, as in evaluation."""
    if config["proto_weight"] <= 0:
        return None
    if not os.path.isfile(os.path.join(stage2_dir, "prototypes.npz")):
        print(f"--predict: no prototype readout, as {stage2_dir}/ holds no prototypes.npz", file=sys.stderr)
        return None
    bank_hash, bank, grid, filled_from = load_bank(stage2_dir)
    if bank_hash != config.get("prototypes_sha256"):
        print(f"--predict: no prototype readout, as {stage2_dir}/prototypes.npz is not the bank the student was "
              "trained against", file=sys.stderr)
        return None
    return bank, grid_centres(grid), filled_from


def found_faces(folder):
    """(face crops, their CSV rows, the unreadable images, the image count) of every image under folder, each face
    found by the cascade (or the centre square where it finds none)."""
    images, others = image_files(folder)
    if others:  # a phone's HEIC photos, say, which PIL does not decode
        print(f"--predict: left out {sum(others.values())} files that are not {'/'.join(IMAGE_EXTENSIONS)} images: "
              + ", ".join(f"{extension} {count}" for extension, count in others.most_common()), file=sys.stderr)
    if not images:
        raise ValueError(f"--predict {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under it")
    faces, rows, unreadable = [], [], []
    for path, found in map_in_threads(faces_in, images, "finding faces"):
        if isinstance(found, OSError):
            unreadable.append(f"{path} ({found})")
            continue
        for index, crop in enumerate(found):
            faces.append(crop.face)
            rows.append([os.path.relpath(path, folder), index, crop.how, *crop.box])
    return faces, rows, unreadable, len(images)


def boxed_faces(folder, boxes):
    """found_faces for the faces of a boxes CSV (path, x, y, width, height), which the user's own detector found:
    each row one face, numbered within its image in the CSV's order."""
    records = box_records(boxes, folder)
    faces, rows, unreadable, numbers = [], [], [], Counter()
    for record, crop in map_in_threads(crop_record, records, "cutting faces"):
        if isinstance(crop, OSError):
            unreadable.append(f"{record.path} ({crop})")
            continue
        name = os.path.relpath(record.path, folder)
        faces.append(crop.face)
        rows.append([name, numbers[name], crop.how, *crop.box])
        numbers[name] += 1
    return faces, rows, sorted(set(unreadable)), len({record.path for record in records})


def predict_folder(folder, output, model, config, prototypes, device, batch_size=512, boxes=None):
    """Classify every face in the images under folder (those of the boxes CSV, given one; else those the cascade
    finds) and write output, a CSV of one row per face: its image, its box and how it was found, the predicted class,
    the class probabilities and the V/A readouts (the prototype readout given prototypes = (bank, centres,
    filled_from))."""
    faces, rows, unreadable, images = boxed_faces(folder, boxes) if boxes else found_faces(folder)
    if not faces:
        raise ValueError(f"--predict {folder}: none of its {images} image files could be read")
    logits, embeddings = predict(model.to(device), np.stack(faces), config["input_size"], device, batch_size)
    write_face_predictions(output, rows, logits, readouts_of(logits, embeddings, config, prototypes))
    centre = sum(row[2] == "centre" for row in rows)
    how = f"faces from {boxes}" if boxes else f"{centre} images with no face found: centre crop"
    print(f"{len(rows)} faces in {images - len(unreadable)} images ({how}) -> {output}")
    for line in unreadable:
        print(f"skipped unreadable image {line}", file=sys.stderr)


def write_face_predictions(output, rows, logits, readouts):
    """The prediction CSV: each row's image, face and box, then its predicted class, probabilities and readouts."""
    probabilities = class_probabilities(logits)
    readout_values = np.concatenate(list(readouts.values()), axis=1)
    with artifacts.atomic_path(output) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "face", "found_by", "x", "y", "width", "height", "predicted",
                             *(f"p_{c}" for c in FER_CLASSES), *readout_columns(readouts)])
            for row, p, va in zip(rows, probabilities, readout_values):
                writer.writerow([*row, FER_CLASSES[int(p.argmax())], *(f"{value:.5f}" for value in (*p, *va))])


def export_for_deployment(path, model, config, name, checkpoint_hash):
    """The student as a torch.export program, and beside it as an ONNX model where the ONNX packages are installed,
    each with what a program of another's needs to use it."""
    synthetic = config["source"] == "synthetic"
    metadata = {
        "student": name, "checkpoint_sha256": checkpoint_hash, "classes": list(FER_CLASSES),
        "input": "uint8 N x 48 x 48 grey face crops, cut as ngd_ext.data.face_crop cuts them (the face box widened by "
                 f"{CROP_MARGIN:.0%} on each side)",
        "outputs": ["logits N x C, in the order of classes (their softmax: the class probabilities)",
                    "embeddings N x E, the projection head's (Proto-KD's space)"],
        "config": config, **({"note": SYNTHETIC_NOTE} if synthetic else {})}
    note = f" ({SYNTHETIC_NOTE})" if synthetic else ""
    export_student(model, config, path, metadata)
    print(f"{name} -> {path} (SHA-256 {artifacts.sha256_file(path)}): a torch.export program of uint8 N x 48 x 48 "
          f"face crops to (logits, embeddings); torch.export.load({path!r}).module() runs it{note}")
    onnx_path = os.path.splitext(path)[0] + ".onnx"
    if not onnx_available():
        print(f"no ONNX model written: it needs the packages {', '.join(ONNX_PACKAGES)} "
              "(pip install -r requirements-dev.txt)", file=sys.stderr)
        return
    export_onnx(model, config, onnx_path, metadata)
    print(f"{name} -> {onnx_path} (SHA-256 {artifacts.sha256_file(onnx_path)}): the same as an ONNX model, inputs "
          f"'faces', outputs 'logits' and 'embeddings'; onnxruntime.InferenceSession({onnx_path!r}) runs it{note}")

