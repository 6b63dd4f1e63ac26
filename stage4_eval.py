"""Stage 4: cross-dataset evaluation of the stage-3 students (SPEC section 5), and prediction on any images.

Evaluates every finished student under RUN_DIR/stage3/ (or those named by --variants) on FERPlus valid and
test, always (by default the FERPlus copy the students were trained on, with the official majority rule), and
on the target sets given: --affectnet DIR, --ckplus DIR, --manifest CSV (repeatable). With no dataset flag,
the targets are the embedded synthetic CK+ tree and AffectNet set, drawn in other styles than the training
faces. Faces in full frames are cropped by the dataset's box, else OpenCV's Haar cascade, else the centre
(counted); see ngd_ext/data/faces.py and ngd_ext/data/face_crop.py. Writes RUN_DIR/stage4/:

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
none is found. With --boxes CSV (path, x, y, width, height) the faces are those your own detector found.

Export: --export FILE writes one student (--variants NAME; default B3), with its preprocessing, as a torch.export
program that runs with torch alone: uint8 N x 48 x 48 face crops in, (logits, embeddings) out; and, where the onnx
packages are installed, the same as an ONNX model beside it (FILE with .onnx), checked by running it.
"""

import argparse
import os
import sys
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ngd_ext import artifacts, cli
from ngd_ext.data.faces import (DatasetError, FaceSet, affectnet_records, ckplus_records, manifest_records,
                                read_class_map, read_faces)
from ngd_ext.data.ferplus import FerPlusError, load_ferplus_cached
from ngd_ext.data.synthetic_faces import synthetic_ferplus, write_synthetic_affectnet, write_synthetic_ckplus
from ngd_ext.emotions import FER_CLASSES
from ngd_ext.inference import SYNTHETIC_NOTE, export_for_deployment, predict_folder, prediction_prototypes, readouts_of
from ngd_ext.metrics import (BOOTSTRAP_LEVEL, MECHANISM_SETS, MECHANISMS, PROTOCOLS, across_seeds, attach_intervals,
                             bootstrap, differences_from_reference, eight_way, intervals, mechanisms,
                             paired_across_seeds, present_only, score_readouts, seed_interval, summary_scores)
from ngd_ext.prototypes import grid_centres, load_bank, proto_kd_targets
from ngd_ext.report import (mechanism_tables, plot_confusions, plot_prototype_occupancy, plot_readout_summary,
                            plot_replicates, plot_summary, plot_tsne, plot_valence_arousal, rated_sets, readout_rows,
                            summary_tables, write_predictions)
from ngd_ext.student_model import EXECUTION_SETTINGS, PRESET_ORDER, label_of, load_student, predict, preset_of

# Defaults ---------------------------------------------------------------------------------------------------
RUN_DIR = "runs/demo"
SYNTHETIC_SIZES = {"demo": dict(sequences=80, per_class=50), "tiny": dict(sequences=16, per_class=8)}
# The settings that only evaluation reads; they take these values after parsing, so that --predict can refuse them.
EVALUATION_DEFAULTS = {"affectnet_split": "validation", "tsne_points": 500, "bootstrap": 1000, "seed": 0}
SELECTION_NOTE = ("Each student is the epoch of its best FERPlus-valid macro-F1, so its FERPlus-valid scores lean "
                  "high; FERPlus test and the other sets took no part in training or in that choice.")
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
    parser.add_argument("--boxes", metavar="CSV",
                        help="prediction mode: the faces to classify, found by your own detector: a CSV with the "
                             "columns path (relative to the --predict folder), x, y, width, height; a row per face")
    parser.add_argument("--export", metavar="FILE",
                        help="export mode: write one student, with its preprocessing, as a torch.export program "
                             "(FILE, e.g. student.pt2) that runs with torch alone, and as ONNX beside it")
    parser.add_argument("--device", type=cli.device, default=cli.default_device(),
                        help="where the students run (default cuda when present)")
    parser.add_argument("--seed", type=int, help="seed of the bootstrap and the t-SNE (default 0)")
    args = parser.parse_args(argv)
    cli.settle_synthetic_flags(parser, args, ["--ferplus", "--affectnet", "--ckplus", "--manifest", "--predict",
                                          "--export"])
    refuse_flags_of_other_modes(parser, args)
    for name, default in EVALUATION_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.tsne_points < 10 or args.batch_size < 1 or args.bootstrap < 100:
        parser.error("--tsne-points must be at least 10, --batch-size at least 1 and --bootstrap at least 100")
    return args


def refuse_flags_of_other_modes(parser, args):
    """A usage error for a flag that the chosen mode (evaluation, --predict or --export) would not use."""
    if args.predict and not os.path.isdir(args.predict):
        parser.error(f"--predict {args.predict}: not a folder (give the folder that holds the images)")
    evaluation_only = [flag for flag in ("--ferplus", "--affectnet", "--ckplus", "--manifest", "--class-map",
                                         "--reference", "--replicates", "--affectnet-split", "--tsne-points",
                                         "--bootstrap", "--seed")
                       if getattr(args, flag[2:].replace("-", "_")) not in (None, [])]
    if args.predict and evaluation_only:
        parser.error(f"{', '.join(evaluation_only)}: evaluation only, and --predict classifies the images of a folder "
                     "with one student; leave them out")
    for flag in ("--output", "--boxes"):
        if getattr(args, flag[2:]) and not args.predict:
            parser.error(f"{flag} is for prediction mode: give it with --predict FOLDER")
    not_exported = [flag for flag in ("--predict", "--skip-unreadable") if getattr(args, flag[2:].replace("-", "_"))]
    if args.export and (evaluation_only or not_exported):
        parser.error(f"{', '.join(evaluation_only + not_exported)}: --export writes one student as a program and "
                     "reads no images; leave them out")
    if args.class_map and not args.manifest:
        parser.error("--class-map reads the index labels of --manifest CSV: give it with --manifest")
    if args.affectnet_split and not args.affectnet:
        parser.error("--affectnet-split chooses the split of --affectnet FOLDER: give it with --affectnet")


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


# What each term did ------------------------------------------------------------------------------------------



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


# Evaluation -------------------------------------------------------------------------------------------------

class Evaluation(NamedTuple):
    """What every student's evaluation shares: the run's bank, the datasets, the bootstrap and where it writes."""
    bank: np.ndarray
    grid: int
    prototypes: tuple   # (bank, bin centres, filled_from), for the prototype readout
    datasets: list      # [(key, display name, FaceSet)]
    note: str
    out_dir: str
    args: argparse.Namespace


def evaluate_student(name, model, config, run):
    """One student on every dataset: its scores with their bootstrap resamples, and its logits and embeddings on
    MECHANISM_SETS; writes its metrics.json, pictures and predictions.csv per dataset."""
    args, results, resampled, outputs = run.args, {}, {}, {}
    model = model.to(args.device)
    for key, dataset_name, data in tqdm(run.datasets, desc=f"evaluating {name}", unit="dataset"):
        logits, embeddings = predict(model, data.images, config["input_size"], args.device, args.batch_size)
        if key in MECHANISM_SETS:
            outputs[key] = logits, embeddings
        scores = {"eight_way": eight_way(logits, data.labels), "present_only": present_only(logits, data.labels)}
        resampled[key] = bootstrap(logits, data.labels, args.bootstrap, args.seed, data.groups)
        for protocol in PROTOCOLS:
            attach_intervals(scores[protocol], resampled[key][protocol])
        readouts = readouts_of(logits, embeddings, config, run.prototypes)
        if data.va is not None:
            scores["valence_arousal"] = score_readouts(readouts, data, args.bootstrap, args.seed)
        results[key] = scores
        write_evaluation(os.path.join(run.out_dir, name, key), f"{label_of(name, config)} on {dataset_name}, "
                         f"{run.note}", scores, data, logits, embeddings, readouts, run)
        artifacts.write_json(os.path.join(run.out_dir, name, key, "metrics.json"), {
            "dataset": dataset_name, "variant": name, "preset": preset_of(config), "note": run.note,
            "classes": list(FER_CLASSES), "data": data.summary(), "bootstrap": bootstrap_settings(args), **scores})
    return results, resampled, outputs


def write_evaluation(folder, title, scores, data, logits, embeddings, readouts, run):
    """One student's pictures and predictions.csv on one dataset."""
    seed = run.args.seed
    if data.va is not None:
        plot_valence_arousal(data.va, readouts, scores["valence_arousal"]["readouts"], title,
                             os.path.join(folder, "valence_arousal.png"), seed)
    plot_confusions(scores["eight_way"], f"8-way: {title}", os.path.join(folder, "confusion_8way.png"))
    plot_confusions(scores["present_only"], f"present-only: {title}", os.path.join(folder, "confusion_present.png"))
    plot_tsne(embeddings, data.labels, run.bank, title, os.path.join(folder, "tsne.png"), run.args.tsne_points, seed)
    plot_prototype_occupancy(embeddings, data.labels, run.bank, run.grid, title, os.path.join(folder, "prototypes.png"))
    write_predictions(os.path.join(folder, "predictions.csv"), data, logits, readouts)


def bootstrap_settings(args):
    return {"resamples": args.bootstrap, "level": BOOTSTRAP_LEVEL, "seed": args.seed,
            "method": "percentile bootstrap over the images, or over their groups where they have them"}


def write_summary(run, students, groups, reference, evaluated):
    """summary.md, summary.tex, summary.json and the summary's pictures, from every student's evaluation."""
    results, resampled, outputs = ({name: evaluated[name][i] for name in students} for i in range(3))
    variants = [(name, config) for name, (_, config, _) in students.items()]
    differences = differences_from_reference(results, resampled, variants, run.datasets, reference)
    replicates = across_seeds(results, groups, variants, run.datasets)
    reference_group = next((group for group, names in groups.items() if reference in names), None)
    paired = paired_across_seeds(replicates, reference_group) if reference_group else {}
    measured = measure_mechanisms(students, outputs, run.datasets, run.bank, run.grid, reference, run.args)
    across = mechanisms_across_seeds(measured, groups, variants)
    markdown, latex = summary_tables(results, differences, replicates, paired, reference, variants, run.datasets,
                                     run.note, run.args.bootstrap,
                                     mechanism_tables(measured, across, variants, run.datasets, reference, run.note))
    with open(os.path.join(run.out_dir, "summary.md"), "w") as handle:
        handle.write(f"# Stage 4 summary ({run.note})\n\n{SELECTION_NOTE}\n\n{markdown}")
    with open(os.path.join(run.out_dir, "summary.tex"), "w") as handle:
        handle.write(f"% Stage 4 summary ({run.note}); needs \\usepackage{{booktabs,amssymb}}\n"
                     f"% {SELECTION_NOTE}\n{latex}")
    artifacts.write_json(os.path.join(run.out_dir, "summary.json"), {
        "note": run.note, "datasets": {key: name for key, name, _ in run.datasets},
        "bootstrap": bootstrap_settings(run.args),
        "results": {name: {key: summary_scores(scores) for key, scores in by_variant.items()}
                    for name, by_variant in results.items()},
        "differences_from": reference, "differences": differences, "replicates": replicates,
        "paired_across_seeds": paired, "mechanisms": measured, "mechanisms_across_seeds": across,
        "mechanism_measures": MECHANISMS})
    plot_summary(results, variants, run.datasets, run.note, os.path.join(run.out_dir, "summary.png"))
    if replicates:
        plot_replicates(replicates, paired, run.datasets, run.note, os.path.join(run.out_dir, "replicates.png"))
    rated = rated_sets(results, reference, run.datasets)
    if rated:
        plot_readout_summary(results, readout_rows(results, variants, rated), rated, run.note,
                             os.path.join(run.out_dir, "summary_valence_arousal.png"))
    return markdown


def evaluate_students(args, names, stage2_dir, stage3_dir):
    bank_hash, bank, grid, filled_from = load_bank(stage2_dir)
    students = {name: load_checked_student(stage3_dir, name, (bank_hash, bank.shape[1])) for name in names}
    students = dict(sorted(students.items(), key=lambda item: (preset_of(item[1][1]), item[0])))  # B0 first
    reference = args.reference or next(iter(students))
    if reference not in students:
        raise ValueError(f"--reference {reference}: not one of the students evaluated ({', '.join(students)})")
    groups = check_replicates(args.replicates, students)
    configs = [config for _, config, _ in students.values()]
    embedded = not (args.ferplus or args.affectnet or args.ckplus or args.manifest)  # no dataset flag
    note = SYNTHETIC_NOTE if embedded or any(config["source"] == "synthetic" for config in configs) else "real data"
    datasets = load_datasets(args, configs, embedded)
    with artifacts.atomic_dir(os.path.join(args.run_dir, "stage4")) as out_dir:
        run = Evaluation(bank, grid, (bank, grid_centres(grid), filled_from), datasets, note, out_dir, args)
        evaluated = {name: evaluate_student(name, model, config, run) for name, (model, config, _) in students.items()}
        markdown = write_summary(run, students, groups, reference, evaluated)
        artifacts.write_config(out_dir, args, {"stage2/prototypes.npz": bank_hash, **{
            f"stage3/{name}/best.pt": checkpoint_hash for name, (_, _, checkpoint_hash) in students.items()}})
        artifacts.write_manifest(out_dir)
    stage4_dir = os.path.join(args.run_dir, "stage4")
    print(f"\n{SELECTION_NOTE}\n\n{markdown}")
    print(f"Tables: {stage4_dir}/summary.md and summary.tex; pictures: {stage4_dir}/summary.png and "
          f"{stage4_dir}/<variant>/<dataset>/*.png ({note})")


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
            output = args.output or os.path.join(args.run_dir, "predictions", f"{names[0]}.csv")
            predict_folder(args.predict, output, model, config, prediction_prototypes(stage2_dir, config),
                           args.device, args.batch_size, args.boxes)
        else:
            export_for_deployment(args.export, model, config, names[0], checkpoint_hash)
        return
    with artifacts.folder_lock(os.path.join(args.run_dir, "stage4")):  # one writer: a second run stops at once
        evaluate_students(args, names, stage2_dir, stage3_dir)


if __name__ == "__main__":
    try:
        main()
    except (DatasetError, FerPlusError, artifacts.ArtifactError, ValueError) as error:
        sys.exit(f"stage4_eval.py: {error}")
