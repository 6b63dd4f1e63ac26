"""Stage 4: cross-dataset evaluation of the stage-3 students (SPEC section 5), and prediction on any images.

Evaluates every finished student under RUN_DIR/stage3/ (or those named by --variants) on FERPlus valid and
test, always (by default the FERPlus copy the students were trained on, with the official majority rule), and
on the target sets given: --affectnet DIR, --ckplus DIR, --manifest CSV (repeatable). With no dataset flag,
the targets are the embedded synthetic CK+ tree and AffectNet set, drawn in other styles than the training
faces. Faces in full frames are cropped by the dataset's box, else OpenCV's Haar cascade, else the centre
(counted); see ngd_ext/face_datasets.py and ngd_ext/face_crop.py. Writes RUN_DIR/stage4/:

  <variant>/<dataset>/metrics.json        8-way and present-only Acc, macro-F1, bACC and per-class P/R/F1, each
                                          with its 95% bootstrap interval; confusion matrices; and what was read,
                                          dropped and how it was cropped
  <variant>/<dataset>/confusion_*.png     counts and row-normalised, 8-way and present-only
  <variant>/<dataset>/tsne.png            t-SNE of the student's embeddings with the prototype bank
  <variant>/<dataset>/prototypes.png      where each class's embeddings land on the V/A prototype grid
  <variant>/<dataset>/valence_arousal.png on a set with valence/arousal ratings (AffectNet's): the student's
                                          readouts of them against the ratings
  <variant>/<dataset>/predictions.csv     per image: label, prediction, class probabilities, V/A readouts, and
                                          the V/A rating where the set has one
  summary.md, summary.tex, summary.json   the ablation table (variants x datasets), each student's difference
                                          from the reference student (--reference; by default the first, B0
                                          where there is one) with its paired-bootstrap interval, each
                                          --replicates group's mean and standard deviation over its seeds and
                                          its difference from the reference's group paired by seed, what each
                                          loss term did (agreement with the KD teacher, Proto-KD KL, the
                                          positive classes' variance, the class means' distance), the
                                          cross-dataset tables, each dataset's per-class F1 of every student, and
                                          the valence/arousal readouts' CCC on rated sets
  summary.png                             every student's 8-way macro-F1 per dataset, with its interval
  replicates.png                          with --replicates: each group's mean, sd and students per dataset,
                                          and the differences paired by seed
  summary_valence_arousal.png             on rated sets: every student's readouts' CCC, with its interval
  config.json, SHA256SUMS

The intervals resample the images (--bootstrap times), or whole groups of them where images are not independent
(a CK+ subject's frames; a manifest's group column): they show how much a score could move on another draw of as
many images (or groups), not the spread over training seeds. For that, train a recipe at several --seed values and
name the students with --replicates GROUP=NAME,NAME,...: the summary adds each group's mean and standard deviation,
and each group's difference from the group of the --reference student, seed by seed, with a t-interval.

Valence and arousal, beyond the paper's protocol: where a set rates its images (AffectNet), each student's reading of
them is scored by CCC, Pearson's r and RMSE, with intervals: the class readout weighs the classes' V/A anchors by the
student's class probabilities; the prototype readout (students trained with Proto-KD) takes the V/A bin of the
image's nearest prototype.

The folder is written whole or not at all: a killed run leaves the previous stage4/ in place; rerun it.

Prediction: --predict FOLDER runs one student (--variants NAME; default B3) on every image under FOLDER and
writes a CSV with one row per face found (its box, the class probabilities and the class readout of valence and
arousal, and the prototype readout where the run holds the student's bank), or one centre-crop row for an image where
none is found.

Export: --export FILE writes one student (--variants NAME; default B3), with its preprocessing, as a torch.export
program that runs with torch alone: uint8 N x 48 x 48 face crops in, (logits, embeddings) out.
"""

import argparse
import csv
import os
import sys
from collections import Counter

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ngd_ext import artifacts, cli  # noqa: E402
from ngd_ext.emotions import DEFAULT_ANCHORS, FER_CLASSES, VA_DIMENSIONS  # noqa: E402
from ngd_ext.face_crop import CROP_MARGIN, thread_cropper  # noqa: E402
from ngd_ext.face_datasets import (IMAGE_EXTENSIONS, DatasetError, FaceSet, affectnet_records,  # noqa: E402
                                   ckplus_records, manifest_records, read_class_map, read_faces)
from ngd_ext.ferplus import FerPlusError, load_ferplus_cached  # noqa: E402
from ngd_ext.images import read_grey  # noqa: E402
from ngd_ext.metrics import (BOOTSTRAP_LEVEL, MECHANISMS, PROTOCOLS, REGRESSION_SCORES, SCORES,  # noqa: E402
                             attach_intervals, bootstrap, eight_way, intervals, mechanisms, present_only,
                             regression_bootstrap, regression_metrics, seed_interval)
from ngd_ext.parallel import map_in_threads  # noqa: E402
from ngd_ext.prototypes import (bin_centres, grid_centres, nearest_prototypes, proto_kd_targets,  # noqa: E402
                                unit_rows)
from ngd_ext.student_model import EXECUTION_SETTINGS, export_student, load_student, predict  # noqa: E402
from ngd_ext.synthetic_faces import synthetic_ferplus, write_synthetic_affectnet, write_synthetic_ckplus  # noqa: E402

# Defaults ---------------------------------------------------------------------------------------------------
RUN_DIR = "runs/demo"
SYNTHETIC_SIZES = {"demo": dict(sequences=80, per_class=50), "tiny": dict(sequences=16, per_class=8)}
# The settings that only evaluation reads; they take these values after parsing, so that --predict can refuse them.
EVALUATION_DEFAULTS = {"affectnet_split": "validation", "tsne_points": 500, "bootstrap": 1000, "seed": 0}
SYNTHETIC_NOTE = "synthetic data: not the paper's numbers"
SELECTION_NOTE = ("Each student is the epoch of its best FERPlus-valid macro-F1, so its FERPlus-valid scores lean "
                  "high; FERPlus test and the other sets took no part in training or in that choice.")
LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "✓": r"\checkmark",
                 "±": r"$\pm$"}
# What may differ between the students of one --replicates group: the seed and the run's name, the KD teacher (each
# seed may have its own), and how the run was executed (what a resumed run may change, and --sync-bn,
# --deterministic). The training faces may not: on the embedded default they are drawn by --data-seed.
REPLICATES_MAY_DIFFER = frozenset({"name", "seed", "kd_teacher", "kd_teacher_sha256", "sync_bn", "deterministic",
                                   *EXECUTION_SETTINGS})


def replicates_spec(text):
    """--replicates GROUP=NAME,NAME,...: (group, [names])."""
    group, _, members = text.partition("=")
    names = [cli.run_name(name.strip()) for name in members.split(",") if name.strip()]
    if not group.strip() or len(set(names)) < 2 or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected GROUP=NAME,NAME,... with at least two different "
                                         "stage-3 run names, e.g. B3=B3_seed0,B3_seed1,B3_seed2")
    return group.strip(), names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=RUN_DIR,
                        help=f"run folder holding stage2/ and stage3/ (default {RUN_DIR})")
    parser.add_argument("--ferplus", help="FERPlus folder (default: the one the students were trained on)")
    parser.add_argument("--affectnet",
                        help="AffectNet folder: validation.csv + Manually_Annotated_Images/, or the face-crop "
                             "release's val_set/ (images/ + annotations/), or class folders")
    parser.add_argument("--affectnet-split", choices=("validation", "training"),
                        help="which AffectNet split to read: validation.csv or val_set/ (default), training.csv or "
                             "train_set/")
    parser.add_argument("--ckplus", help="CK+ folder: cohn-kanade-images/ and Emotion/, or class folders of face "
                                         "crops (as in CK+48)")
    parser.add_argument("--manifest", action="append", default=[],
                        help="CSV with an image path and a label column (repeatable; the paper's release's headers are "
                             "read as they are); its file name names the dataset")
    parser.add_argument("--class-map", metavar="JSON",
                        help="for --manifest's index labels: {\"0\": \"neutral\", ...} or {\"neutral\": 0, ...} "
                             "(default: FERPlus's order)")
    parser.add_argument("--variants", nargs="+", type=cli.run_name,
                        help="stage-3 run names under stage3/ (default: every finished one)")
    parser.add_argument("--reference", type=cli.run_name,
                        help="the student the others are compared with, image by image (default: the first in the "
                             "tables, the B0 one where there is one); e.g. B2, to see what D-Geo adds in B3. Its "
                             "--replicates group, if it has one, is the one the other groups are compared with, seed "
                             "by seed")
    parser.add_argument("--replicates", action="append", default=[], type=replicates_spec, metavar="GROUP=NAME,NAME",
                        help="students trained alike with different --seed (repeatable): the summary gives the mean "
                             "and standard deviation of their scores, the spread over training seeds, and each "
                             "group's differences from the --reference student's group, seed by seed")
    cli.add_synthetic_flags(parser, SYNTHETIC_SIZES, "the embedded synthetic CK+ and AffectNet sets")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="count and leave out missing or undecodable images instead of stopping")
    parser.add_argument("--tsne-points", type=int,
                        help=f"images per t-SNE (default {EVALUATION_DEFAULTS['tsne_points']})")
    parser.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default 512)")
    parser.add_argument("--bootstrap", type=int,
                        help=f"bootstrap resamples of the images behind every interval (default "
                             f"{EVALUATION_DEFAULTS['bootstrap']}, at least 100)")
    parser.add_argument("--predict", metavar="FOLDER",
                        help="prediction mode: classify the faces in every image under FOLDER")
    parser.add_argument("--output",
                        help="prediction mode: the CSV to write (default RUN_DIR/predictions/<variant>.csv)")
    parser.add_argument("--export", metavar="FILE",
                        help="export mode: write one student, with its preprocessing, as a torch.export program "
                             "(FILE, e.g. student.pt2) that runs with torch alone")
    parser.add_argument("--device", type=cli.device, default=cli.default_device(),
                        help="where the students run (default cuda when present)")
    parser.add_argument("--seed", type=int, help="seed of the bootstrap and the t-SNE (default 0)")
    args = parser.parse_args(argv)
    cli.settle_synthetic_flags(parser, args, ["--ferplus", "--affectnet", "--ckplus", "--manifest", "--predict",
                                          "--export"])
    if args.predict and not os.path.isdir(args.predict):
        parser.error(f"--predict {args.predict}: not a folder (give the folder that holds the images)")
    evaluation_only = [flag for flag in ("--ferplus", "--affectnet", "--ckplus", "--manifest", "--class-map",
                                         "--reference", "--replicates", "--affectnet-split", "--tsne-points",
                                         "--bootstrap", "--seed")
                       if getattr(args, flag[2:].replace("-", "_")) not in (None, [])]
    if args.predict and evaluation_only:
        parser.error(f"{', '.join(evaluation_only)}: evaluation only, and --predict classifies the images of a folder "
                     "with one student; leave them out")
    if args.output and not args.predict:
        parser.error("--output names the CSV of prediction mode: give it with --predict FOLDER")
    not_exported = [flag for flag in ("--predict", "--skip-unreadable") if getattr(args, flag[2:].replace("-", "_"))]
    if args.export and (evaluation_only or not_exported):
        parser.error(f"{', '.join(evaluation_only + not_exported)}: --export writes one student as a program and "
                     "reads no images; leave them out")
    if args.class_map and not args.manifest:
        parser.error("--class-map reads the index labels of --manifest CSV: give it with --manifest")
    if args.affectnet_split and not args.affectnet:
        parser.error("--affectnet-split chooses the split of --affectnet FOLDER: give it with --affectnet")
    for name, default in EVALUATION_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.tsne_points < 10 or args.batch_size < 1 or args.bootstrap < 100:
        parser.error("--tsne-points must be at least 10, --batch-size at least 1 and --bootstrap at least 100")
    return args


# Students ---------------------------------------------------------------------------------------------------

def finished_variants(stage3_dir, names):
    """The stage-3 runs to evaluate: `names`, or every folder of stage3/ whose manifest lists best.pt."""
    if names:
        return names
    found = []
    for name in sorted(os.listdir(stage3_dir)) if os.path.isdir(stage3_dir) else []:
        if not cli.RUN_NAME.fullmatch(name):  # a run's lock, its work under way, a swap's previous copy
            continue
        try:
            if "best.pt" in artifacts.read_manifest(os.path.join(stage3_dir, name)):
                found.append(name)
        except artifacts.ArtifactError:
            if os.path.isdir(os.path.join(stage3_dir, name)):
                print(f"skipping {os.path.join(stage3_dir, name)}: not a finished stage-3 run "
                      f"(no {artifacts.MANIFEST})")
    if not found:
        raise artifacts.ArtifactError(f"{stage3_dir}: no finished stage-3 run; run stage3_student.py first")
    return found


def load_bank(stage2_dir):
    """Stage 2's prototype bank after its manifest check: (its SHA-256, bank K x E, grid side G, filled_from)."""
    bank_hash = artifacts.verify_manifest(stage2_dir, ["prototypes.npz"])["prototypes.npz"]
    with np.load(os.path.join(stage2_dir, "prototypes.npz")) as saved:
        return bank_hash, saved["bank"].astype(np.float64), int(saved["G"]), saved["filled_from"]


def load_checked_student(stage3_dir, name, bank=None):
    """A stage-3 best.pt after its manifest check; with bank = (its SHA-256, its dimension), refused if it was
    trained against another bank."""
    folder = os.path.join(stage3_dir, name)
    checkpoint_hash = artifacts.verify_manifest(folder, ["best.pt"])["best.pt"]
    path = os.path.join(folder, "best.pt")
    model, config = load_student(path, len(FER_CLASSES))
    if bank is not None and (config.get("prototypes_sha256"), config["embedding_size"]) != bank:
        raise artifacts.ArtifactError(f"{path} was trained against another prototype bank than "
                                      "stage2/prototypes.npz of this run; evaluate it in its own run folder")
    return model, config, checkpoint_hash


def check_replicates(replicates, students):
    """--replicates' groups, {group: [student names]}, after checking that each group's students are among those
    evaluated, in no other group, of different seeds, and trained alike in everything but REPLICATES_MAY_DIFFER."""
    def shown(value):  # the class weights are a list of floats, too long to read in a message
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    groups, grouped = {}, {}
    for group, names in replicates:
        if group in groups:
            raise ValueError(f"--replicates {group}: named twice")
        for name in names:
            if name not in students:
                raise ValueError(f"--replicates {group}: {name} is not one of the students evaluated "
                                 f"({', '.join(students)})")
            if name in grouped:
                raise ValueError(f"--replicates {group}: {name} is already in --replicates {grouped[name]}")
            grouped[name] = group
        configs = [students[name][1] for name in names]
        differing = [key for key in sorted(set().union(*configs) - REPLICATES_MAY_DIFFER)
                     if any(config.get(key) != configs[0].get(key) for config in configs)]
        if differing:
            raise ValueError(f"--replicates {group}: its students were not trained alike: " + "; ".join(
                f"{key} is " + ", ".join(f"{shown(config.get(key))} in {name}" for name, config in zip(names, configs))
                for key in differing) + " (only the seed, the name, the KD teacher and how the run was executed may "
                "differ)")
        seeds = [config["seed"] for config in configs]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"--replicates {group}: seeds " + ", ".join(
                f"{seed} ({name})" for name, seed in zip(names, seeds)) + ": replicates need different seeds")
        groups[group] = names
    return groups


PRESET_ORDER = ("B0", "B1", "B2", "B3")  # each adds one term to the one before


def preset_of(config):
    """'B0'..'B3' when the loss terms in use are a preset's, 'Full (T=1)' for B3 with KL distillation at T = 1 (the
    paper's row of that name), else 'custom'."""
    used = (config["kd_weight"] > 0, config["proto_weight"] > 0, config["dgeo_weight"] > 0)
    presets = {(False, False, False): "B0", (True, False, False): "B1", (True, True, False): "B2",
               (True, True, True): "B3"}
    preset = presets.get(used, "custom")
    if preset == "B3" and config.get("kd_loss") == "kl" and config.get("kd_temperature") == 1:
        return "Full (T=1)"
    return preset


def label_of(name, config):
    """A student's name in tables and titles: its run name, and its preset when the name does not say it."""
    preset = preset_of(config)
    return name if name == preset else f"{name} ({preset})"


# Datasets ---------------------------------------------------------------------------------------------------

def training_ferplus(configs, run_dir):
    """The FERPlus folder the students were trained on: the real copy given to stage 3, or the run's synthetic faces of
    the students' size and data seed (written again if missing)."""
    def trained_on(config, write):
        if config["source"] == "real":
            return config["ferplus"]
        data_seed = config.get("data_seed", config["seed"])  # students trained before --data-seed drew with --seed
        return synthetic_ferplus(run_dir, config["synthetic_size"], data_seed, write=write)

    folders = {trained_on(config, write=False) for config in configs}
    if len(folders) > 1:
        raise ValueError(f"the students were trained on different FERPlus data ({', '.join(sorted(folders))}); "
                         "give --ferplus")
    return trained_on(configs[0], write=True)


def load_datasets(args, configs, embedded):
    """[(key, display name, FaceSet)]: FERPlus valid and test first, then the target sets (the embedded
    synthetic CK+ and AffectNet sets when `embedded`)."""
    ferplus_dir = args.ferplus or training_ferplus(configs, args.run_dir)
    splits, _ = load_ferplus_cached(ferplus_dir, os.path.join(args.run_dir, "cache"), "majority")
    datasets = [(f"ferplus_{split}", f"FERPlus {split}", FaceSet(f"FERPlus {split}", splits[split].images,
                                                                 splits[split].labels, splits[split].names, {}))
                for split in ("valid", "test")]
    targets = []
    if embedded:
        size = SYNTHETIC_SIZES[args.synthetic_size]
        data_dir = os.path.join(args.run_dir, "data")
        args.ckplus = os.path.join(data_dir, f"synthetic_ckplus_{args.synthetic_size}_seed{args.data_seed}")
        args.affectnet = os.path.join(data_dir, f"synthetic_affectnet_{args.synthetic_size}_seed{args.data_seed}")
        if not os.path.isdir(args.ckplus):
            write_synthetic_ckplus(args.ckplus, args.data_seed, sequences=size["sequences"])
        if not os.path.isdir(args.affectnet):
            write_synthetic_affectnet(args.affectnet, args.data_seed, per_class=size["per_class"])
    if args.ckplus:
        targets.append(("ckplus", "CK+", ckplus_records(args.ckplus)))
    if args.affectnet:
        targets.append(("affectnet", "AffectNet", affectnet_records(args.affectnet, args.affectnet_split)))
    class_map = read_class_map(args.class_map) if args.class_map else None
    for path in args.manifest:
        stem = os.path.splitext(os.path.basename(path))[0]
        targets.append((f"manifest_{stem}", stem, manifest_records(path, class_map)))
    if len({key for key, _, _ in targets}) != len(targets):
        raise ValueError("two --manifest files share a file name; rename one so their results do not collide")
    for key, name, (records, dropped) in targets:
        datasets.append((key, name, read_faces(name, records, dropped, args.skip_unreadable)))
    for _, name, data in datasets:
        summary = data.summary()
        counts = ", ".join(f"{c} {n}" for c, n in summary["per_class"].items())
        extra = "".join(f"; {what}: {count}" for what, count in {**data.dropped, **{
            f"crop by {how}": n for how, n in data.crops.items() if n}}.items())
        rated = summary["rated_valence_arousal"]
        print(f"{name}: {summary['images']} images ({counts}){extra}"
              + (f"; {rated} with valence/arousal ratings" if rated else "")
              + (f"; {len(data.unreadable)} unreadable, left out" if data.unreadable else ""))
    return datasets


# Valence and arousal ----------------------------------------------------------------------------------------

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


def score_readouts(readouts, data, resamples, seed):
    """The readouts scored against the ratings of the set's rated images, with bootstrap intervals over the images, or
    their groups: {"images", "readouts": {readout: {dimension: {score, ..., "interval"}}}}."""
    rated = ~np.isnan(data.va[:, 0])
    groups = None if data.groups is None else [group for group, kept in zip(data.groups, rated) if kept]
    scored = {}
    for readout, values in readouts.items():
        scored[readout] = regression_metrics(values[rated], data.va[rated])
        samples = regression_bootstrap(values[rated], data.va[rated], resamples, seed, groups)
        for dimension in VA_DIMENSIONS:
            scored[readout][dimension]["interval"] = intervals(samples[dimension])
    return {"images": int(rated.sum()), "readouts": scored}


# What each term did ------------------------------------------------------------------------------------------

MECHANISM_SETS = ("ferplus_valid", "ferplus_test")  # the source domain, where the terms were trained


def teacher_logits(config, students, outputs, key, data, args):
    """(name, logits on dataset `key`) of the student's KD teacher: the evaluated student whose best.pt is the one stage
    3 recorded (by SHA-256), else the file its config names if it still is that file; None without a teacher or where
    neither is at hand."""
    digest = config.get("kd_teacher_sha256")
    if not digest:
        return None
    for name, (_, _, checkpoint_hash) in students.items():
        if checkpoint_hash == digest:
            return name, outputs[name][key][0]
    path = config.get("kd_teacher")
    if not (path and os.path.isfile(path) and artifacts.sha256_file(path) == digest):
        print(f"no teacher agreement: the KD teacher {path} is neither evaluated here nor where it was",
              file=sys.stderr)
        return None
    model, teacher_config = load_student(path, len(FER_CLASSES))
    return path, predict(model.to(args.device), data.images, teacher_config["input_size"], args.device,
                         args.batch_size)[0]


def agreement_baseline(name, teacher, students, reference):
    """A CE-only student that is neither this one nor its teacher, to score against the same teacher: the reference
    where it is one, else the first."""
    candidates = [other for other, (_, config, _) in students.items()
                  if preset_of(config) == "B0" and other not in (name, teacher)]
    return reference if reference in candidates else next(iter(candidates), None)


def measure_mechanisms(students, outputs, datasets, bank, grid, reference, args):
    """{student: {dataset: {"values", "intervals", "differences" from the reference, and with a KD teacher "teacher",
    "baseline", "baseline_agreement", "agreement_gain"}}} on FERPlus valid and test: MECHANISMS, each with its bootstrap
    interval, and paired-bootstrap intervals of the differences (the draws depend only on the seed and the image
    count). A measure that does not apply (no teacher; no positive class of 2 images) is left out."""
    measured = {name: {} for name in students}
    for key, _, data in (dataset for dataset in datasets if dataset[0] in MECHANISM_SETS):
        samples = {}

        def measure(name, teacher=None):
            config = students[name][1]
            positive = [c in config["positive"] for c in FER_CLASSES]
            return mechanisms(*outputs[name][key], data.labels, proto_kd_targets(bank, grid, config["anchors"],
                                                                                  config["tau"]),
                              bank, config["tau"], positive, args.bootstrap, args.seed, teacher)

        for name, (_, config, _) in students.items():
            teacher = teacher_logits(config, students, outputs, key, data, args)
            values, samples[name] = measure(name, None if teacher is None else teacher[1])
            kept = [m for m in MECHANISMS if np.isfinite(values[m])]
            entry = measured[name][key] = {"values": {m: values[m] for m in kept},
                                           "intervals": intervals({m: samples[name][m] for m in kept})}
            if teacher:
                entry["teacher"] = teacher[0]
            baseline = teacher and agreement_baseline(name, teacher[0], students, reference)
            if baseline:
                theirs, their_samples = measure(baseline, teacher[1])
                gain = samples[name]["teacher_agreement"] - their_samples["teacher_agreement"]
                entry.update(baseline=baseline, baseline_agreement=theirs["teacher_agreement"],
                             agreement_gain={"difference": values["teacher_agreement"] - theirs["teacher_agreement"],
                                             "interval": intervals({"gain": gain})["gain"]})
        for name, entry in measured.items():
            if name != reference:
                shared = [m for m in entry[key]["values"] if m in measured[reference][key]["values"] and
                          m != "teacher_agreement"]
                entry[key]["differences"] = {m: {
                    "difference": entry[key]["values"][m] - measured[reference][key]["values"][m],
                    "interval": intervals({m: samples[name][m] - samples[reference][m]})[m]} for m in shared}
    return measured


def mechanisms_across_seeds(measured, groups, variants):
    """Per --replicates group and FERPlus split: each measure's values over the seeds, the mean agreement gain with its
    t-interval, and each measure's difference from the group of the preceding preset (B1 from B0, B2 from B1, B3 from
    B2), paired by seed: {group: {"preset", "seeds", "from", "datasets": {dataset: {...}}}}."""
    configs = dict(variants)
    presets = {group: {preset_of(configs[name]) for name in names} for group, names in groups.items()}
    by_preset = {next(iter(found)): group for group, found in presets.items() if len(found) == 1}
    summary = {}
    for group, names in groups.items():
        preset = next(iter(presets[group])) if len(presets[group]) == 1 else "custom"
        previous = PRESET_ORDER[PRESET_ORDER.index(preset) - 1] if preset in PRESET_ORDER[1:] else None
        before = by_preset.get(previous)
        seeds = {configs[name]["seed"]: name for name in names}
        entry = summary[group] = {"preset": preset, "seeds": sorted(seeds), "from": before, "datasets": {}}
        for key in MECHANISM_SETS:
            if not all(key in measured[name] for name in names):
                continue
            found = entry["datasets"][key] = {}
            gains = [measured[name][key]["agreement_gain"]["difference"] for name in names
                     if "agreement_gain" in measured[name][key]]
            if len(gains) == len(names) > 1:
                found["agreement_gain"] = seed_interval(gains)
            theirs = {configs[name]["seed"]: name for name in groups.get(before, [])}
            paired = sorted(set(seeds) & set(theirs))
            if len(paired) > 1:
                found["differences"] = {m: seed_interval([
                    measured[seeds[s]][key]["values"][m] - measured[theirs[s]][key]["values"][m] for s in paired])
                    for m in MECHANISMS if m != "teacher_agreement" and all(
                        m in measured[name][key]["values"] for name in (*(seeds[s] for s in paired),
                                                                        *(theirs[s] for s in paired)))}
    return summary


# Pictures and tables ----------------------------------------------------------------------------------------

def plot_confusions(view, title, path):
    """Counts and row-normalised confusion matrices, over the view's classes."""
    classes = view.get("classes", list(range(len(FER_CLASSES))))
    counts = np.array(view["confusion"])[np.ix_(classes, classes)]
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    names = [FER_CLASSES[c] for c in classes]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(classes), 0.6 * len(classes) + 2))
    for ax, matrix, label in ((axes[0], counts, "counts"), (axes[1], normalised, "row-normalised")):
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), value in np.ndenumerate(matrix):
            text = f"{value:d}" if label == "counts" else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(label, fontsize=9)
    figure.suptitle(title, fontsize=10)
    artifacts.save_figure(figure, path)


def plot_tsne(embeddings, labels, bank, title, path, points, seed):
    """t-SNE of (a seeded sample of) the unit embeddings, with the 25 unit prototypes as black crosses."""
    chosen = np.random.default_rng(seed).permutation(len(labels))[:points]
    joint = np.concatenate([unit_rows(embeddings[chosen]), unit_rows(bank)])
    perplexity = min(30.0, (len(joint) - 1) / 3)
    xy = TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(joint)
    figure, ax = plt.subplots(figsize=(6.5, 5.5))
    for c, name in enumerate(FER_CLASSES):
        mine = labels[chosen] == c
        if mine.any():
            ax.scatter(*xy[:len(chosen)][mine].T, s=8, color=plt.cm.tab10(c), label=f"{name} ({mine.sum()})")
    ax.scatter(*xy[len(chosen):].T, marker="x", s=40, color="black", label="prototypes")
    ax.legend(fontsize=7, markerscale=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    artifacts.save_figure(figure, path)


def plot_prototype_occupancy(embeddings, labels, bank, grid, title, path):
    """Per class, the share of its images whose nearest prototype (cosine) is each bin of the V/A grid, with
    the class's anchor marked. A bin stage 2 filled from a neighbour holds the same prototype; ties between
    equal prototypes go to the lower index."""
    nearest = nearest_prototypes(embeddings, bank)
    centres = bin_centres(grid)
    figure, axes = plt.subplots(2, 4, figsize=(12, 6.2))
    for c, (name, ax) in enumerate(zip(FER_CLASSES, axes.flat)):
        mine = nearest[labels == c]
        share = np.bincount(mine, minlength=grid * grid) / max(len(mine), 1)
        # k = i_valence * G + i_arousal: valence along x, arousal along y
        ax.imshow(share.reshape(grid, grid).T, origin="lower", cmap="Purples", vmin=0, vmax=1,
                  extent=(centres[0] * 1.25, centres[-1] * 1.25, centres[0] * 1.25, centres[-1] * 1.25))
        ax.plot(*DEFAULT_ANCHORS[name], marker="*", color="orange", markersize=12)
        ax.set_title(f"{name} ({len(mine)})", fontsize=9)
        ax.set_xlabel("valence", fontsize=8)
        ax.set_ylabel("arousal", fontsize=8)
    figure.suptitle(f"{title}: nearest prototype per image (star: the class's V/A anchor)", fontsize=10)
    artifacts.save_figure(figure, path)


def plot_valence_arousal(ratings, readouts, scores, title, path, seed, points=2000):
    """Each readout of valence and of arousal against the ratings (N x 2, NaN for an unrated image), for (a seeded
    sample of) the rated images."""
    rated = np.flatnonzero(~np.isnan(ratings[:, 0]))
    chosen = rated[np.random.default_rng(seed).permutation(len(rated))[:points]]
    figure, axes = plt.subplots(len(readouts), 2, figsize=(8, 3.8 * len(readouts)), squeeze=False)
    for row, (readout, values) in zip(axes, readouts.items()):
        for d, (ax, dimension) in enumerate(zip(row, VA_DIMENSIONS)):
            ax.scatter(ratings[chosen, d], values[chosen, d], s=6, alpha=0.4)
            ax.plot([-1, 1], [-1, 1], color="grey", lw=0.8)
            ax.set_xlim(-1.05, 1.05)
            ax.set_ylim(-1.05, 1.05)
            ax.set_aspect("equal")
            ax.set_xlabel(f"rated {dimension}", fontsize=8)
            ax.set_ylabel(f"{readout} readout", fontsize=8)
            got = scores[readout][dimension]
            ax.set_title(f"{dimension}: CCC {got['ccc']:.2f}, r {got['pearson_r']:.2f}, RMSE {got['rmse']:.2f}",
                         fontsize=9)
    shown = f"{len(chosen)} of {len(rated)}" if len(chosen) < len(rated) else f"{len(rated)}"
    figure.suptitle(f"{title}: V/A read out from the student ({shown} rated images)", fontsize=10)
    artifacts.save_figure(figure, path)


def class_probabilities(logits):
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def readout_columns(readouts):
    """The CSV columns of V/A readouts: valence_from_class, arousal_from_class, ..."""
    return [f"{dimension}_from_{readout}" for readout in readouts for dimension in VA_DIMENSIONS]


def write_predictions(path, data, logits, readouts):
    """Per image: its path, label, predicted class, class probabilities and V/A readouts, and its rating where the set
    has them (empty for an unrated image)."""
    probabilities = class_probabilities(logits)
    readout_values = np.concatenate(list(readouts.values()), axis=1)
    ratings = [] if data.va is None else [f"rated_{dimension}" for dimension in VA_DIMENSIONS]
    with artifacts.atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "predicted", *(f"p_{name}" for name in FER_CLASSES),
                             *readout_columns(readouts), *ratings])
            for i, (name, label, row) in enumerate(zip(data.paths, data.labels, probabilities)):
                rating = [] if data.va is None else ["" if np.isnan(value) else f"{value:.6f}" for value in data.va[i]]
                writer.writerow([name, FER_CLASSES[label], FER_CLASSES[int(row.argmax())],
                                 *(f"{value:.5f}" for value in (*row, *readout_values[i])), *rating])


def latex_escape(text):
    """Text as LaTeX typesets it literally (run and dataset names may hold &, %, _ ...)."""
    return "".join(LATEX_ESCAPES.get(character, character) for character in text)


def table(header, rows, caption):
    """The same table as Markdown and as LaTeX (booktabs)."""
    def markdown_row(cells):
        return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"

    def latex_row(cells):
        return " & ".join(map(latex_escape, cells)) + r" \\"

    markdown = [f"**{caption}**", "", markdown_row(header), f"|{'|'.join('---' for _ in header)}|",
                *map(markdown_row, rows)]
    latex = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\begin{{tabular}}{{l{'c' * (len(header) - 1)}}}", r"\toprule", latex_row(header), r"\midrule",
             *map(latex_row, rows), r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(markdown), "\n".join(latex)


def differences_from_reference(results, resampled, variants, datasets, reference):
    """Every other student's scores minus the reference student's, per dataset and protocol, with the
    paired-bootstrap interval of each difference: both students were scored on the same resamples of the images.
    Shaped as `results` is: {name: {dataset: {protocol: {score: difference, "interval": {score: [low, high]}}}}}."""

    def difference(name, key, protocol):
        mine, theirs = results[name][key][protocol], results[reference][key][protocol]
        mine_resampled, theirs_resampled = resampled[name][key][protocol], resampled[reference][key][protocol]
        spread = intervals({score: mine_resampled[score] - theirs_resampled[score] for score in SCORES})
        return {**{score: mine[score] - theirs[score] for score in SCORES}, "interval": spread}

    return {name: {key: {protocol: difference(name, key, protocol) for protocol in PROTOCOLS} for key, _, _ in datasets}
            for name, _ in variants if name != reference}


def across_seeds(results, groups, variants, datasets):
    """Each --replicates group's scores over its students: {group: {"students": [...], "seeds": [...], "datasets":
    {dataset: {protocol: {score: {"mean", "sd", "values"}}, and on a rated set "valence_arousal": {readout:
    {dimension: {score: {"mean", "sd", "values"}}}}}}}}; sd is the sample standard deviation (over n - 1)."""
    configs = dict(variants)

    def spread(values):
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "values": values}

    def on_dataset(names, key):
        scores = [results[name][key] for name in names]
        entry = {protocol: {score: spread([mine[protocol][score] for mine in scores]) for score in SCORES}
                 for protocol in PROTOCOLS}
        if "valence_arousal" in scores[0]:  # students trained alike have the same readouts
            readouts = [mine["valence_arousal"]["readouts"] for mine in scores]
            entry["valence_arousal"] = {readout: {dimension: {
                score: spread([mine[readout][dimension][score] for mine in readouts]) for score in REGRESSION_SCORES}
                for dimension in VA_DIMENSIONS} for readout in readouts[0]}
        return entry

    return {group: {"students": names, "seeds": [configs[name]["seed"] for name in names],
                    "datasets": {key: on_dataset(names, key) for key, _, _ in datasets}}
            for group, names in groups.items()}


def paired_across_seeds(replicates, reference_group):
    """Each other --replicates group's scores minus the reference group's, paired by training seed: {group: {"from",
    "seeds", "datasets": {dataset: {protocol: {score: difference}, and on a rated set "valence_arousal": {readout:
    {dimension: {score: difference}}} for the readouts both groups have}}}}, each difference {"mean", "sd",
    "interval", "above_zero", "values"}, over the seeds both groups have (a group sharing fewer than two with the
    reference is left out). A seed fixes the initial weights, the batch order and the augmentation, so a seed's two
    students differ chiefly by their recipe. The interval is Student's t interval of the mean difference (n - 1
    degrees of freedom), which takes the seeds' differences as normal."""
    reference = replicates[reference_group]
    paired_groups = {}
    for group, entry in replicates.items():
        seeds = sorted(set(entry["seeds"]) & set(reference["seeds"]))
        if group == reference_group or len(seeds) < 2:
            continue
        pairs = [(entry["seeds"].index(seed), reference["seeds"].index(seed)) for seed in seeds]

        def difference(mine, theirs):  # two groups' spreads of one score, as across_seeds gives them
            return seed_interval([mine["values"][i] - theirs["values"][j] for i, j in pairs])

        datasets = {}
        for key, mine in entry["datasets"].items():
            theirs = reference["datasets"][key]
            datasets[key] = {protocol: {score: difference(mine[protocol][score], theirs[protocol][score])
                                        for score in SCORES} for protocol in PROTOCOLS}
            if "valence_arousal" in mine:
                mine_va, theirs_va = mine["valence_arousal"], theirs["valence_arousal"]
                datasets[key]["valence_arousal"] = {readout: {dimension: {
                    score: difference(mine_va[readout][dimension][score], theirs_va[readout][dimension][score])
                    for score in REGRESSION_SCORES} for dimension in VA_DIMENSIONS}
                    for readout in mine_va if readout in theirs_va}
        paired_groups[group] = {"from": reference_group, "seeds": seeds, "datasets": datasets}
    return paired_groups


def percent(value):
    return f"{100 * value:.1f}"


def with_interval(value, bounds, signed=False):
    """A score in % (or a difference in points, with its sign) and its interval: '53.5 [48.2, 58.9]'."""
    form = "+.1f" if signed else ".1f"
    return f"{100 * value:{form}} [{100 * bounds[0]:{form}}, {100 * bounds[1]:{form}}]"


def protocol_cells(scores):
    """One protocol's Acc, macro-F1 with its interval, and bACC, in %."""
    return [percent(scores["accuracy"]), with_interval(scores["macro_f1"], scores["interval"]["macro_f1"]),
            percent(scores["balanced_accuracy"])]


def rated_sets(results, reference, datasets):
    """[(key, display name)] of the datasets whose images carry valence/arousal ratings."""
    return [(key, dataset_name) for key, dataset_name, _ in datasets if "valence_arousal" in results[reference][key]]


def readout_rows(results, variants, rated):
    """[(name, config, readout)]: every student's V/A readouts, in READOUTS' order (a student has the same readouts
    on every set)."""
    return [(name, config, readout) for name, config in variants for readout in READOUTS
            if readout in results[name][rated[0][0]]["valence_arousal"]["readouts"]]


def summary_tables(results, differences, replicates, paired, reference, variants, datasets, note, resamples,
                   mechanisms_done=()):
    """The ablation table (variants x datasets, 8-way and present-only macro-F1), the differences from the reference
    student (8-way macro-F1, with paired-bootstrap intervals), the --replicates groups' mean and standard deviation
    over training seeds and their differences from the reference's group paired by seed (8-way macro-F1), per variant
    the cross-dataset table (datasets x both protocols' Acc, macro-F1 with its interval, bACC), per dataset each
    class's 8-way F1 (classes x variants, with intervals), and on the sets with valence/arousal ratings the CCC of each
    student's readouts. Returns (markdown, latex)."""
    level = f"{100 * BOOTSTRAP_LEVEL:.0f}%"
    tables = []
    header = ["variant", "KD", "Proto-KD", "D-Geo", *(name for _, name, _ in datasets)]
    rows = []
    for name, config in variants:
        marks = ["✓" if config[weight] > 0 else "" for weight in ("kd_weight", "proto_weight", "dgeo_weight")]
        rows.append([label_of(name, config), *marks, *(
            f"{percent(results[name][key]['eight_way']['macro_f1'])} / "
            f"{percent(results[name][key]['present_only']['macro_f1'])}" for key, _, _ in datasets)])
    tables.append(table(header, rows, f"Ablation: macro-F1 (%), 8-way / present-only, by variant and dataset ({note})"))
    if differences:
        rows = [[label_of(name, config), *(with_interval(differences[name][key]["eight_way"]["macro_f1"],
                                                         differences[name][key]["eight_way"]["interval"]["macro_f1"],
                                                         signed=True) for key, _, _ in datasets)]
                for name, config in variants if name in differences]
        tables.append(table(["variant", *(name for _, name, _ in datasets)], rows,
                            f"Difference from {label_of(reference, dict(variants)[reference])}: 8-way macro-F1, in "
                            f"points, with its {level} paired-bootstrap interval over the images or their groups "
                            f"({resamples} resamples; {note})"))
    if replicates:
        rows = [[group, ", ".join(map(str, entry["seeds"])), *(
            "{0:.1f} ± {1:.1f}".format(*(100 * entry["datasets"][key]["eight_way"]["macro_f1"][stat]
                                          for stat in ("mean", "sd"))) for key, _, _ in datasets)]
                for group, entry in replicates.items()]
        tables.append(table(["replicates", "seeds", *(name for _, name, _ in datasets)], rows,
                            f"Across training seeds: 8-way macro-F1 (%), mean ± standard deviation (n - 1) over each "
                            f"--replicates group's students ({note})"))
    if paired:
        def cell(difference):
            return (f"{with_interval(difference['mean'], difference['interval'], signed=True)}, "
                    f"{difference['above_zero']} of {len(difference['values'])} above 0")

        rows = [[group, ", ".join(map(str, entry["seeds"])), *(
            cell(entry["datasets"][key]["eight_way"]["macro_f1"]) for key, _, _ in datasets)]
            for group, entry in paired.items()]
        tables.append(table(["replicates", "seeds", *(name for _, name, _ in datasets)], rows,
                            f"Paired by training seed: each group's 8-way macro-F1 minus that of "
                            f"{next(iter(paired.values()))['from']}'s student of the same seed, in points: the mean "
                            f"over the seeds, its {level} t-interval (n - 1 degrees of freedom), and how many seeds' "
                            f"differences are above 0 ({note})"))
    tables += mechanisms_done
    for name, config in variants:
        header = ["dataset", "images", "Acc", f"macro-F1 [{level}]", "bACC", "present classes", "Acc (present)",
                  f"macro-F1 (present) [{level}]", "bACC (present)"]
        rows = []
        for key, dataset_name, data in datasets:
            eight, present = results[name][key]["eight_way"], results[name][key]["present_only"]
            groups = data.summary()["groups"]
            images = f"{len(data.labels)}" + (f" ({groups} groups)" if groups is not None else "")
            rows.append([dataset_name, images, *protocol_cells(eight), str(len(present["classes"])),
                         *protocol_cells(present)])
        tables.append(table(header, rows, f"Cross-dataset evaluation of {label_of(name, config)}, in %, with "
                                          f"bootstrap intervals over the images, or their groups where given ({note})"))
    for key, dataset_name, _ in datasets:
        per_class = {name: results[name][key]["eight_way"]["per_class"] for name, _ in variants}
        rows = [[FER_CLASSES[c], str(row["support"]), *(
            with_interval(per_class[name][c]["f1"], per_class[name][c]["interval"]["f1"]) for name, _ in variants)]
            for c, row in enumerate(per_class[reference])]
        tables.append(table(["class", "images", *(label_of(name, config) for name, config in variants)], rows,
                            f"Per-class F1 (%, 8-way) on {dataset_name}, with {level} bootstrap intervals, which say "
                            f"little for a class of very few images ({note})"))
    rated = rated_sets(results, reference, datasets)
    if rated:
        def cell(scores):
            low, high = scores["interval"]["ccc"]
            return f"{scores['ccc']:.2f} [{low:.2f}, {high:.2f}] (r {scores['pearson_r']:.2f})"

        rows = [[label_of(name, config), readout, *(
            cell(results[name][key]["valence_arousal"]["readouts"][readout][dimension]) for key, _ in rated
            for dimension in VA_DIMENSIONS)] for name, config, readout in readout_rows(results, variants, rated)]
        counts = ", ".join(f"{dataset_name} {results[reference][key]['valence_arousal']['images']}"
                           for key, dataset_name in rated)
        tables.append(table(["student", "readout", *(f"{dataset_name} {dimension}" for _, dataset_name in rated
                                                     for dimension in VA_DIMENSIONS)], rows,
                            f"Valence and arousal read out from the students, beyond the paper's protocol: CCC with "
                            f"its {level} bootstrap interval, and Pearson's r, against the ratings of the rated images "
                            f"({counts}); prototype: {READOUTS['prototype']}, class: {READOUTS['class']} ({note})"))
    return ("\n\n".join(md for md, _ in tables) + "\n", "\n\n".join(tex for _, tex in tables) + "\n")


MECHANISM_COLUMNS = {"proto_kd_kl": ("Proto-KD: KL to class targets", ".3f"),
                     "positive_variance": ("D-Geo: positive-class variance", ".3f"),
                     "class_mean_distance": ("D-Geo: class-mean distance", ".3f")}


def mechanism_cell(entry, measure, form):
    """A measure's value with its interval, and its difference from the reference with the paired interval."""
    if measure not in entry["values"]:
        return "–"
    low, high = entry["intervals"][measure]
    cell = f"{entry['values'][measure]:{form}} [{low:{form}}, {high:{form}}]"
    if measure in entry.get("differences", {}):
        change = entry["differences"][measure]
        cell += f"; {change['difference']:+{form}} [{change['interval'][0]:+{form}}, {change['interval'][1]:+{form}}]"
    return cell


def agreement_cell(entry):
    """A student's agreement with its KD teacher (%), against a CE-only student's with the same teacher where there is
    one, with the paired interval of the gain."""
    if "teacher" not in entry:
        return "– (no KD teacher)"
    mine = percent(entry["values"]["teacher_agreement"])
    if "agreement_gain" not in entry:
        return f"{mine} (no other CE-only student to compare)"
    gain = entry["agreement_gain"]
    low, high = (100 * bound for bound in gain["interval"])
    return (f"{mine} against {percent(entry['baseline_agreement'])} of {entry['baseline']}: "
            f"{100 * gain['difference']:+.1f} [{low:+.1f}, {high:+.1f}]")


def seed_cell(spread, scale=1.0, form="+.3f"):
    """A difference paired by seed: its mean, t-interval and how many seeds' differences are above 0."""
    low, high = (scale * bound for bound in spread["interval"])
    seeds = len(spread["values"])
    return f"{scale * spread['mean']:{form}} [{low:{form}}, {high:{form}}], {spread['above_zero']} of {seeds} > 0"


def mechanism_tables(measured, across, variants, datasets, reference, note):
    """'What each term did' on FERPlus valid and test, student by student, and with --replicates across seeds."""
    level = f"{100 * BOOTSTRAP_LEVEL:.0f}%"
    tables = []
    for key, dataset_name, _ in (dataset for dataset in datasets if dataset[0] in MECHANISM_SETS):
        rows = []
        for name, config in variants:
            entry = measured[name][key]
            rows.append([label_of(name, config), agreement_cell(entry), *(
                mechanism_cell(entry, measure, form) for measure, (_, form) in MECHANISM_COLUMNS.items())])
        tables.append(table(["student", "KD: top-1 agreement with its teacher (%)",
                             *(title for title, _ in MECHANISM_COLUMNS.values())], rows,
                            f"What each term did on {dataset_name}: agreement with the student's KD teacher against a "
                            f"CE-only student's with the same teacher (KD should raise it); the Proto-KD KL of the "
                            f"embeddings to their class's target (Proto-KD should lower it); the positive classes' "
                            f"variance (the cap should lower it) and the class means' distance (the margin should "
                            f"raise it); each with its {level} bootstrap interval, and after ';' its difference from "
                            f"{reference} with the paired interval ({note})"))
    rows = []
    for group, entry in across.items():
        found = entry["datasets"].get("ferplus_test", {})
        gain, changes = found.get("agreement_gain"), found.get("differences", {})
        rows.append([group, ", ".join(map(str, entry["seeds"])), entry["from"] or "–",
                     seed_cell(gain, 100, "+.1f") if gain else "–",
                     *(seed_cell(changes[measure]) if measure in changes else "–" for measure in MECHANISM_COLUMNS)])
    if rows:
        tables.append(table(["replicates", "seeds", "compared with", "KD: agreement gain (points)",
                             *(f"{title}: change" for title, _ in MECHANISM_COLUMNS.values())], rows,
                            f"What each term did on FERPlus test, across training seeds: the agreement gain over a "
                            f"CE-only student, and each measure's change from the group of the preset one term short, "
                            f"paired by seed: the mean, its {level} t-interval (n - 1 degrees of freedom) and how many "
                            f"seeds' changes are above 0 ({note})"))
    return tables


def summary_scores(scores):
    """One student's scores on one dataset as summary.json keeps them: metrics.json's, without the confusion
    matrices."""
    kept = {protocol: {**{score: scores[protocol][score] for score in SCORES}, "interval": scores[protocol]["interval"],
                       "per_class": scores[protocol]["per_class"]} for protocol in PROTOCOLS}
    if "valence_arousal" in scores:
        kept["valence_arousal"] = scores["valence_arousal"]
    return kept


def bar_centres(bars, ticks):
    """Where `bars` bars stand side by side at each of `ticks` ticks: one array of x per bar, and their width."""
    width = 0.8 / bars
    return [np.arange(ticks) + (b - (bars - 1) / 2) * width for b in range(bars)], width


def bars_with_intervals(ax, centres, width, scores, bounds, label):
    """Bars at `scores`, whiskers to their interval `bounds` (n x 2), each score written above its whisker."""
    ax.bar(centres, scores, width, yerr=[scores - bounds[:, 0], bounds[:, 1] - scores], capsize=2,
           error_kw=dict(lw=0.8), label=label)
    for x, score, top in zip(centres, scores, bounds[:, 1]):
        ax.text(x, top + 0.01, f"{score:.2f}", ha="center", va="bottom", fontsize=7)


def plot_summary(results, variants, datasets, note, path):
    figure, ax = plt.subplots(figsize=(2 + 1.6 * len(datasets), 4))
    all_centres, width = bar_centres(len(variants), len(datasets))
    for centres, (name, config) in zip(all_centres, variants):
        scores = np.array([results[name][key]["eight_way"]["macro_f1"] for key, _, _ in datasets])
        bounds = np.array([results[name][key]["eight_way"]["interval"]["macro_f1"] for key, _, _ in datasets])
        bars_with_intervals(ax, centres, width, scores, bounds, label_of(name, config))
    ax.set_xticks(range(len(datasets)), [name for _, name, _ in datasets])
    ax.set_ylabel(f"8-way macro-F1 ({100 * BOOTSTRAP_LEVEL:.0f}% bootstrap interval)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Students across datasets ({note})", fontsize=10)
    artifacts.save_figure(figure, path)


def plot_replicates(replicates, paired, datasets, note, path):
    """Each --replicates group's 8-way macro-F1 per dataset: a bar at the mean, a whisker of one standard deviation
    either side, and a dot per student; beside it, where groups are paired by seed, each group's differences from the
    reference group: a dot per seed, and the mean with its t-interval."""
    panels = 2 if paired else 1
    figure, axes = plt.subplots(1, panels, figsize=(panels * (2 + 1.6 * len(datasets)), 4), squeeze=False)
    ax = axes[0, 0]
    all_centres, width = bar_centres(len(replicates), len(datasets))
    colours = {group: f"C{g}" for g, group in enumerate(replicates)}
    for centres, (group, entry) in zip(all_centres, replicates.items()):
        spreads = [entry["datasets"][key]["eight_way"]["macro_f1"] for key, _, _ in datasets]
        seeds = ", ".join(map(str, entry["seeds"]))
        ax.bar(centres, [spread["mean"] for spread in spreads], width, yerr=[spread["sd"] for spread in spreads],
               capsize=2, error_kw=dict(lw=0.8), color=colours[group], alpha=0.6, label=f"{group} (seeds {seeds})")
        for x, spread in zip(centres, spreads):
            ax.plot([x] * len(spread["values"]), spread["values"], "o", ms=3, color=colours[group],
                    markeredgecolor="black", markeredgewidth=0.5)
    ax.set_xticks(range(len(datasets)), [name for _, name, _ in datasets])
    ax.set_ylabel("8-way macro-F1 (mean ± sd; a dot per seed)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Across training seeds ({note})", fontsize=10)
    if paired:
        ax = axes[0, 1]
        reference_group = next(iter(paired.values()))["from"]
        all_centres, width = bar_centres(len(paired), len(datasets))
        for centres, (group, entry) in zip(all_centres, paired.items()):
            differences = [entry["datasets"][key]["eight_way"]["macro_f1"] for key, _, _ in datasets]
            means = np.array([difference["mean"] for difference in differences])
            bounds = np.array([difference["interval"] for difference in differences])
            ax.errorbar(centres, 100 * means, yerr=100 * np.abs(bounds.T - means), fmt="s", ms=5, capsize=3,
                        color=colours[group], label=f"{group} minus {reference_group}: mean, "
                                                    f"{100 * BOOTSTRAP_LEVEL:.0f}% t-interval; a dot per seed")
            for x, difference in zip(centres, differences):
                ax.plot([x + width / 4] * len(difference["values"]), 100 * np.array(difference["values"]), "o",
                        ms=3, color=colours[group], markeredgecolor="black", markeredgewidth=0.5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(datasets)), [name for _, name, _ in datasets])
        ax.set_ylabel("8-way macro-F1 difference (points)")
        ax.legend(fontsize=8)
        ax.set_title(f"Paired by training seed ({note})", fontsize=10)
    artifacts.save_figure(figure, path)


def plot_readout_summary(results, rows, rated, note, path):
    """Each student's readouts' CCC per rated set and dimension, with its interval; rows as readout_rows gives them."""
    ticks = [(key, f"{dataset_name}\n{dimension}", dimension) for key, dataset_name in rated
             for dimension in VA_DIMENSIONS]
    figure, ax = plt.subplots(figsize=(max(6.5, 2 + 1.6 * len(ticks)), 4.3))
    all_centres, width = bar_centres(len(rows), len(ticks))
    for centres, (name, config, readout) in zip(all_centres, rows):
        scores = [results[name][key]["valence_arousal"]["readouts"][readout][dimension] for key, _, dimension in ticks]
        ccc = np.array([mine["ccc"] for mine in scores])
        bounds = np.array([mine["interval"]["ccc"] for mine in scores])
        bars_with_intervals(ax, centres, width, ccc, bounds, f"{label_of(name, config)}, {readout}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(ticks)), [label for _, label, _ in ticks])
    ax.set_ylabel(f"CCC ({100 * BOOTSTRAP_LEVEL:.0f}% bootstrap interval)")
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Valence and arousal read out from the students, against the ratings\n({note})", fontsize=10)
    artifacts.save_figure(figure, path)


# Prediction mode --------------------------------------------------------------------------------------------

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


def predict_folder(args, model, config, name, prototypes):
    images, others = image_files(args.predict)
    if others:  # a phone's HEIC photos, say, which PIL does not decode
        print(f"--predict: left out {sum(others.values())} files that are not {'/'.join(IMAGE_EXTENSIONS)} images: "
              + ", ".join(f"{extension} {count}" for extension, count in others.most_common()), file=sys.stderr)
    if not images:
        raise ValueError(f"--predict {args.predict}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under it")
    faces, rows, unreadable = [], [], []
    for path, found in map_in_threads(faces_in, images, "finding faces"):
        if isinstance(found, OSError):
            unreadable.append(f"{path} ({found})")
            continue
        for index, crop in enumerate(found):
            faces.append(crop.face)
            rows.append([os.path.relpath(path, args.predict), index, crop.how, *crop.box])
    if not faces:
        raise ValueError(f"--predict {args.predict}: none of its {len(images)} image files could be read")
    model = model.to(args.device)
    logits, embeddings = predict(model, np.stack(faces), config["input_size"], args.device, args.batch_size)
    probabilities = class_probabilities(logits)
    readouts = readouts_of(logits, embeddings, config, prototypes)
    readout_values = np.concatenate(list(readouts.values()), axis=1)
    output = args.output or os.path.join(args.run_dir, "predictions", f"{name}.csv")
    with artifacts.atomic_path(output) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "face", "found_by", "x", "y", "width", "height", "predicted",
                             *(f"p_{c}" for c in FER_CLASSES), *readout_columns(readouts)])
            for row, p, va in zip(rows, probabilities, readout_values):
                writer.writerow([*row, FER_CLASSES[int(p.argmax())], *(f"{value:.5f}" for value in (*p, *va))])
    centre = sum(row[2] == "centre" for row in rows)
    print(f"{len(rows)} faces in {len(images) - len(unreadable)} images ({centre} images with no face found: "
          f"centre crop) -> {output}")
    for line in unreadable:
        print(f"skipped unreadable image {line}", file=sys.stderr)


def export_for_deployment(path, model, config, name, checkpoint_hash):
    """The student as a torch.export program, with what a program of another's needs to use it."""
    synthetic = config["source"] == "synthetic"
    export_student(model, config, path, {
        "student": name, "checkpoint_sha256": checkpoint_hash, "classes": list(FER_CLASSES),
        "input": "uint8 N x 48 x 48 grey face crops, cut as ngd_ext.face_crop cuts them (the face box widened by "
                 f"{CROP_MARGIN:.0%} on each side)",
        "outputs": ["logits N x C, in the order of classes (their softmax: the class probabilities)",
                    "embeddings N x E, the projection head's (Proto-KD's space)"],
        "config": config, **({"note": SYNTHETIC_NOTE} if synthetic else {})})
    print(f"{name} -> {path} (SHA-256 {artifacts.sha256_file(path)}): a torch.export program of uint8 N x 48 x 48 "
          f"face crops to (logits, embeddings); torch.export.load({path!r}).module() runs it"
          + (f" ({SYNTHETIC_NOTE})" if synthetic else ""))


def main(argv=None):
    args = parse_args(argv)
    stage2_dir, stage3_dir = os.path.join(args.run_dir, "stage2"), os.path.join(args.run_dir, "stage3")
    names = finished_variants(stage3_dir, args.variants)

    if args.predict or args.export:  # one student, and only the image model runs
        mode = "--predict" if args.predict else "--export"
        if len(names) > 1:
            if "B3" not in names or args.variants:
                raise ValueError(f"{mode} uses one student: name it with --variants (found {', '.join(names)})")
            names = ["B3"]
        model, config, checkpoint_hash = load_checked_student(stage3_dir, names[0])
        if args.predict:  # the run's prototype bank, where it has one, adds a readout
            predict_folder(args, model, config, names[0], prediction_prototypes(stage2_dir, config))
        else:
            export_for_deployment(args.export, model, config, names[0], checkpoint_hash)
        return
    with artifacts.folder_lock(os.path.join(args.run_dir, "stage4")):  # one writer: a second run stops at once
        evaluate_students(args, names, stage2_dir, stage3_dir)


def evaluate_students(args, names, stage2_dir, stage3_dir):
    # Students and data ------------------------------------------------------------------------------------
    bank_hash, bank, grid, filled_from = load_bank(stage2_dir)
    prototypes = (bank, grid_centres(grid), filled_from)
    students = {name: load_checked_student(stage3_dir, name, (bank_hash, bank.shape[1])) for name in names}
    students = dict(sorted(students.items(), key=lambda item: (preset_of(item[1][1]), item[0])))  # B0 first
    reference = args.reference or next(iter(students))
    if reference not in students:
        raise ValueError(f"--reference {reference}: not one of the students evaluated ({', '.join(students)})")
    groups = check_replicates(args.replicates, students)
    configs = [config for _, config, _ in students.values()]
    embedded = not (args.ferplus or args.affectnet or args.ckplus or args.manifest)  # no dataset flag
    synthetic = embedded or any(config["source"] == "synthetic" for config in configs)
    note = SYNTHETIC_NOTE if synthetic else "real data"
    datasets = load_datasets(args, configs, embedded)

    # Evaluation -------------------------------------------------------------------------------------------
    results, resampled, outputs = {}, {}, {}
    bootstrap_settings = {"resamples": args.bootstrap, "level": BOOTSTRAP_LEVEL, "seed": args.seed,
                          "method": "percentile bootstrap over the images, or over their groups where they have them"}
    with artifacts.atomic_dir(os.path.join(args.run_dir, "stage4")) as out_dir:
        for name, (model, config, _) in students.items():
            model = model.to(args.device)
            results[name], resampled[name], outputs[name] = {}, {}, {}
            for key, dataset_name, data in tqdm(datasets, desc=f"evaluating {name}", unit="dataset"):
                logits, embeddings = predict(model, data.images, config["input_size"], args.device, args.batch_size)
                if key in MECHANISM_SETS:
                    outputs[name][key] = logits, embeddings
                scores = {"eight_way": eight_way(logits, data.labels),
                          "present_only": present_only(logits, data.labels)}
                resampled[name][key] = bootstrap(logits, data.labels, args.bootstrap, args.seed, data.groups)
                for protocol in PROTOCOLS:
                    attach_intervals(scores[protocol], resampled[name][key][protocol])
                folder = os.path.join(out_dir, name, key)
                title = f"{label_of(name, config)} on {dataset_name}, {note}"
                readouts = readouts_of(logits, embeddings, config, prototypes)
                if data.va is not None:
                    scores["valence_arousal"] = score_readouts(readouts, data, args.bootstrap, args.seed)
                    plot_valence_arousal(data.va, readouts, scores["valence_arousal"]["readouts"], title,
                                         os.path.join(folder, "valence_arousal.png"), args.seed)
                results[name][key] = scores
                artifacts.write_json(os.path.join(folder, "metrics.json"), {
                    "dataset": dataset_name, "variant": name, "preset": preset_of(config), "note": note,
                    "classes": list(FER_CLASSES), "data": data.summary(), "bootstrap": bootstrap_settings,
                    **scores})
                plot_confusions(scores["eight_way"], f"8-way: {title}", os.path.join(folder, "confusion_8way.png"))
                plot_confusions(scores["present_only"], f"present-only: {title}",
                                os.path.join(folder, "confusion_present.png"))
                plot_tsne(embeddings, data.labels, bank, title, os.path.join(folder, "tsne.png"), args.tsne_points,
                          args.seed)
                plot_prototype_occupancy(embeddings, data.labels, bank, grid, title,
                                         os.path.join(folder, "prototypes.png"))
                write_predictions(os.path.join(folder, "predictions.csv"), data, logits, readouts)

        variants = [(name, config) for name, (_, config, _) in students.items()]
        differences = differences_from_reference(results, resampled, variants, datasets, reference)
        replicates = across_seeds(results, groups, variants, datasets)
        reference_group = next((group for group, names in groups.items() if reference in names), None)
        paired = paired_across_seeds(replicates, reference_group) if reference_group else {}
        measured = measure_mechanisms(students, outputs, datasets, bank, grid, reference, args)
        across = mechanisms_across_seeds(measured, groups, variants)
        markdown, latex = summary_tables(results, differences, replicates, paired, reference, variants, datasets,
                                         note, args.bootstrap,
                                         mechanism_tables(measured, across, variants, datasets, reference, note))
        with open(os.path.join(out_dir, "summary.md"), "w") as handle:
            handle.write(f"# Stage 4 summary ({note})\n\n{SELECTION_NOTE}\n\n{markdown}")
        with open(os.path.join(out_dir, "summary.tex"), "w") as handle:
            handle.write(f"% Stage 4 summary ({note}); needs \\usepackage{{booktabs,amssymb}}\n"
                         f"% {SELECTION_NOTE}\n{latex}")
        artifacts.write_json(os.path.join(out_dir, "summary.json"), {
            "note": note, "datasets": {key: name for key, name, _ in datasets}, "bootstrap": bootstrap_settings,
            "results": {name: {key: summary_scores(scores) for key, scores in by_variant.items()}
                        for name, by_variant in results.items()},
            "differences_from": reference, "differences": differences, "replicates": replicates,
            "paired_across_seeds": paired, "mechanisms": measured, "mechanisms_across_seeds": across,
            "mechanism_measures": MECHANISMS})
        plot_summary(results, variants, datasets, note, os.path.join(out_dir, "summary.png"))
        if replicates:
            plot_replicates(replicates, paired, datasets, note, os.path.join(out_dir, "replicates.png"))
        rated = rated_sets(results, reference, datasets)
        if rated:
            plot_readout_summary(results, readout_rows(results, variants, rated), rated, note,
                                 os.path.join(out_dir, "summary_valence_arousal.png"))
        artifacts.write_config(out_dir, args, {"stage2/prototypes.npz": bank_hash, **{
            f"stage3/{name}/best.pt": checkpoint_hash for name, (_, _, checkpoint_hash) in students.items()}})
        artifacts.write_manifest(out_dir)

    stage4_dir = os.path.join(args.run_dir, "stage4")
    print(f"\n{SELECTION_NOTE}\n\n{markdown}")
    print(f"Tables: {stage4_dir}/summary.md and summary.tex; pictures: {stage4_dir}/summary.png and "
          f"{stage4_dir}/<variant>/<dataset>/*.png ({note})")


if __name__ == "__main__":
    try:
        main()
    except (DatasetError, FerPlusError, artifacts.ArtifactError, ValueError) as error:
        sys.exit(f"stage4_eval.py: {error}")
