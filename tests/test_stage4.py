"""Stage 4: the whole demo end to end at a tiny scale, its outputs checked against each other, prediction
mode, refused checkpoints, and a failed run that leaves the previous results in place."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

import stage1_teacher
import stage2_prototypes
import stage3_student
import stage4_eval
from ngd_ext import artifacts, inference, metrics, report
from ngd_ext.data.faces import DatasetError, affectnet_records, read_faces
from ngd_ext.data.ferplus import load_ferplus_cached
from ngd_ext.data.synthetic_faces import EXPRESSIONS, draw_face, place_face
from ngd_ext.emotions import DEFAULT_ANCHORS, FER_CLASSES, VA_DIMENSIONS
from ngd_ext.metrics import PROTOCOLS, REGRESSION_SCORES, SCORES, eight_way
from ngd_ext.prototypes import grid_centres, proto_kd_targets
from ngd_ext.student_model import EXPORT_METADATA, Student, label_of, load_student, predict, preset_of

TINY3 = ["--synthetic-size", "tiny", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]
DATASETS = ["ferplus_valid", "ferplus_test", "ckplus", "affectnet"]
PER_DATASET = {"metrics.json", "confusion_8way.png", "confusion_present.png", "tsne.png", "prototypes.png",
               "predictions.csv"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """scripts/demo.sh's steps, in its order, at the tiny scale."""
    run_dir = str(tmp_path_factory.mktemp("demo"))
    stage1_teacher.main(["--run-dir", run_dir, "--synthetic-size", "tiny", "--epochs", "2", "--device", "cpu"])
    stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])
    stage3_student.main(["--run-dir", run_dir, "--variant", "B0", "--name", "kd_teacher", *TINY3])
    stage3_student.main(["--run-dir", run_dir, "--variant", "B3", "--kd-teacher",
                         os.path.join(run_dir, "stage3", "kd_teacher", "best.pt"), *TINY3])
    stage4 = ["--run-dir", run_dir, "--synthetic-size", "tiny", "--tsne-points", "60", "--device", "cpu"]
    stage4_eval.main(stage4)
    return run_dir, stage4


def test_outputs_and_manifest(demo, capsys):
    run_dir, _ = demo
    out = os.path.join(run_dir, "stage4")
    expected = {"summary.md", "summary.tex", "summary.json", "summary.png", "config.json"}
    expected |= {f"{variant}/{dataset}/{name}" for variant in ("B3", "kd_teacher") for dataset in DATASETS
                 for name in PER_DATASET}
    expected |= {f"{variant}/affectnet/valence_arousal.png" for variant in ("B3", "kd_teacher")}  # the rated set
    expected.add("summary_valence_arousal.png")
    assert set(artifacts.read_manifest(out)) == expected
    artifacts.verify_manifest(out, sorted(expected))
    assert not [name for name in os.listdir(run_dir) if ".tmp-" in name or ".old-" in name]


def read_evaluation(folder):
    """A stage-4 dataset folder's metrics.json, and its predictions.csv as (rows, labels, class probabilities)."""
    with open(os.path.join(folder, "metrics.json")) as handle:
        scores = json.load(handle)
    with open(os.path.join(folder, "predictions.csv")) as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([FER_CLASSES.index(row["label"]) for row in rows])
    probabilities = np.array([[float(row[f"p_{name}"]) for name in FER_CLASSES] for row in rows])
    return scores, rows, labels, probabilities


def test_metrics_agree_with_the_predictions_and_the_data(demo):
    run_dir, _ = demo
    scores, rows, labels, probabilities = read_evaluation(os.path.join(run_dir, "stage4", "B3", "ckplus"))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    recomputed = eight_way(probabilities, labels)
    assert scores["eight_way"]["accuracy"] == pytest.approx(recomputed["accuracy"], abs=1e-12)
    assert scores["eight_way"]["confusion"] == recomputed["confusion"]
    # the tiny synthetic CK+ tree: 16 labelled sequences (3 apex frames and a neutral first frame each), and
    # 12 unlabelled sequences dropped and counted; every face found by the detector
    data = scores["data"]
    assert data["images"] == len(rows) == 64 and data["per_class"]["neutral"] == 16
    assert data["dropped"] == {"sequence without an emotion label": 12}
    assert data["crops"]["detected"] + data["crops"]["centre"] == 64 and data["crops"]["box"] == 0
    assert scores["note"] == "synthetic data: not the paper's numbers"
    assert scores["present_only"]["classes"] == sorted({int(c) for c in labels})


def test_summary_tables_cover_every_variant_and_dataset(demo):
    run_dir, _ = demo
    out = os.path.join(run_dir, "stage4")
    with open(os.path.join(out, "summary.md")) as handle:
        markdown = handle.read()
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    assert markdown.startswith("# Stage 4 summary (synthetic data: not the paper's numbers)\n\n"
                               "Each student is the epoch of its best FERPlus-valid macro-F1, so its FERPlus-valid "
                               "scores lean high;")
    header = "| variant | KD | Proto-KD | D-Geo | FERPlus valid | FERPlus test | CK+ | AffectNet |"
    assert header in markdown
    b3 = summary["results"]["B3"]["affectnet"]
    row = next(line for line in markdown.splitlines() if line.startswith("| B3 |"))
    assert row.split(" | ")[1:4] == ["✓", "✓", "✓"]
    assert f"{100 * b3['eight_way']['macro_f1']:.1f} / {100 * b3['present_only']['macro_f1']:.1f}" in row
    assert next(line for line in markdown.splitlines() if line.startswith("| kd_teacher (B0) |")).split(" | ")[1:4] \
        == ["", "", ""]
    with open(os.path.join(out, "summary.tex")) as handle:
        latex = handle.read()
    assert latex.splitlines()[1] == f"% {stage4_eval.SELECTION_NOTE}"
    assert latex.count(r"\begin{tabular}") == 11 and r"B3 & \checkmark & \checkmark & \checkmark" in latex


def test_what_each_term_did_is_measured_on_the_students_own_outputs(demo):
    """summary.json's mechanism measures of B3 on FERPlus test, against the students and the bank run directly: its
    agreement with kd_teacher (its KD teacher, found by the SHA-256 stage 3 recorded), the Proto-KD KL that SPEC's
    reference op gives, and the class geometry of its unit embeddings; and the table that shows them."""
    from test_metrics import mechanisms_by_hand

    run_dir, _ = demo
    with open(os.path.join(run_dir, "stage4", "summary.json")) as handle:
        summary = json.load(handle)
    splits = load_ferplus_cached(
        os.path.join(run_dir, "data", "synthetic_ferplus_tiny_seed0"), os.path.join(run_dir, "cache"), "majority")[0]
    with np.load(os.path.join(run_dir, "stage2", "prototypes.npz")) as saved:
        bank, grid = saved["bank"].astype(np.float64), int(saved["G"])
    outputs = {}
    for name in ("B3", "kd_teacher"):
        model, config = load_student(os.path.join(run_dir, "stage3", name, "best.pt"))
        outputs[name] = predict(model, splits["test"].images, config["input_size"], "cpu")
    config = load_student(os.path.join(run_dir, "stage3", "B3", "best.pt"))[1]
    expected = mechanisms_by_hand(
        *outputs["B3"], splits["test"].labels, proto_kd_targets(bank, grid, config["anchors"], config["tau"]),
        bank, config["tau"], np.array([c in config["positive"] for c in FER_CLASSES]), outputs["kd_teacher"][0])
    measured = summary["mechanisms"]["B3"]["ferplus_test"]
    assert measured["teacher"] == "kd_teacher" and "agreement_gain" not in measured  # no other CE-only student here
    assert measured["values"] == {name: pytest.approx(value, rel=1e-5) for name, value in expected.items()}
    teacher = summary["mechanisms"]["kd_teacher"]["ferplus_test"]
    assert "teacher" not in teacher and "teacher_agreement" not in teacher["values"]
    assert measured["differences"]["proto_kd_kl"]["difference"] == pytest.approx(
        measured["values"]["proto_kd_kl"] - teacher["values"]["proto_kd_kl"])
    with open(os.path.join(run_dir, "stage4", "summary.md")) as handle:
        table = handle.read().split("**What each term did on FERPlus test")[1]
    row = next(line for line in table.splitlines() if line.startswith("| B3 |"))
    assert row.split(" | ")[1] == (f"{100 * expected['teacher_agreement']:.1f} (no other CE-only student to compare)")


def test_a_b3_student_distilled_by_kl_at_t1_is_the_papers_full_t1_row():
    config = {"kd_weight": 0.3, "proto_weight": 0.12, "dgeo_weight": 0.012, "kd_loss": "kl", "kd_temperature": 1.0}
    assert preset_of(config) == "Full (T=1)"
    assert label_of("B3_t1", config) == "B3_t1 (Full (T=1))"
    assert preset_of({**config, "kd_temperature": 5.0}) == "B3"
    assert preset_of({**config, "kd_loss": "mse"}) == "B3"


def test_intervals_and_differences_come_from_the_predictions(demo):
    """metrics.json's intervals are the bootstrap of predictions.csv's predictions, with stage 4's seed, drawing
    AffectNet's images one by one and CK+'s subjects whole; summary's difference of B3 from kd_teacher (B0) is that of
    their scores, and its interval that of the paired resamples."""
    run_dir, _ = demo
    out = os.path.join(run_dir, "stage4")
    resampled = {}
    for key in ("affectnet", "ckplus"):
        for name in ("kd_teacher", "B3"):
            scores, rows, labels, probabilities = read_evaluation(os.path.join(out, name, key))
            groups = None
            if key == "ckplus":  # cohn-kanade-images/<subject>/<sequence>/<frame>.png
                groups = [os.path.basename(os.path.dirname(os.path.dirname(row["path"]))) for row in rows]
                ckplus_subjects = len(set(groups))
                assert 1 < ckplus_subjects < len(rows)
            assert scores["data"]["groups"] == (None if groups is None else ckplus_subjects)
            assert scores["bootstrap"] == {"resamples": 1000, "level": 0.95, "seed": 0, "method": "percentile "
                                           "bootstrap over the images, or over their groups where they have them"}
            resampled[name, key] = metrics.bootstrap(probabilities, labels, 1000, seed=0, groups=groups)
            for protocol in metrics.PROTOCOLS:
                bounds = metrics.intervals(resampled[name, key][protocol])
                assert scores[protocol]["interval"] == {score: bounds[score] for score in metrics.SCORES}
                assert [row["interval"]["f1"] for row in scores[protocol]["per_class"]] == bounds["f1"]
    resampled = {name: resampled[name, "affectnet"] for name in ("kd_teacher", "B3")}
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["differences_from"] == "kd_teacher" and list(summary["differences"]) == ["B3"]
    difference = summary["differences"]["B3"]["affectnet"]["eight_way"]
    results = summary["results"]
    assert difference["macro_f1"] == pytest.approx(results["B3"]["affectnet"]["eight_way"]["macro_f1"]
                                                   - results["kd_teacher"]["affectnet"]["eight_way"]["macro_f1"])
    paired = {score: resampled["B3"]["eight_way"][score] - resampled["kd_teacher"]["eight_way"][score]
              for score in metrics.SCORES}
    assert difference["interval"] == metrics.intervals(paired)
    with open(os.path.join(out, "summary.md")) as handle:
        markdown = handle.read()
    low, high = difference["interval"]["macro_f1"]
    cell = f"{100 * difference['macro_f1']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
    table = markdown.split("**Difference from kd_teacher (B0): 8-way macro-F1, in points")[1]
    assert next(line for line in table.splitlines() if line.startswith("| B3 |")).endswith(f"| {cell} |")
    ckplus_row = next(line for line in markdown.splitlines() if line.startswith("| CK+ |"))
    assert ckplus_row.startswith(f"| CK+ | 64 ({ckplus_subjects} groups) |")
    per_class = markdown.split("**Per-class F1 (%, 8-way) on CK+, with 95% bootstrap intervals")[1].split("**")[1]
    assert "| class | images | kd_teacher (B0) | B3 |" in per_class
    for c, name in enumerate(FER_CLASSES):
        rows = [results[variant]["ckplus"]["eight_way"]["per_class"][c] for variant in ("kd_teacher", "B3")]
        cells = [f"{100 * row['f1']:.1f} [{100 * row['interval']['f1'][0]:.1f}, {100 * row['interval']['f1'][1]:.1f}]"
                 for row in rows]
        assert f"| {name} | {rows[1]['support']} | {cells[0]} | {cells[1]} |" in per_class


def test_valence_and_arousal_readouts_come_from_the_students(demo):
    """On the rated set (the synthetic AffectNet's 64 images of codes 0-7, each with a rating), metrics.json's scores
    are those of the readouts recomputed from the student, the bank and the ratings in validation.csv: the class
    readout for both students, the prototype readout for B3 alone (kd_teacher, B0, has no Proto-KD); the summary's
    table shows them."""
    run_dir, _ = demo
    out = os.path.join(run_dir, "stage4")
    affectnet = os.path.join(run_dir, "data", "synthetic_affectnet_tiny_seed0")
    with open(os.path.join(affectnet, "Manually_Annotated_file_lists", "validation.csv")) as handle:
        ratings = np.array([[float(row["valence"]), float(row["arousal"])] for row in csv.DictReader(handle)
                            if int(row["expression"]) <= 7])
    assert len(ratings) == 64
    data = read_faces("AffectNet", *affectnet_records(affectnet))
    with np.load(os.path.join(run_dir, "stage2", "prototypes.npz")) as saved:
        prototypes = saved["bank"].astype(np.float64), grid_centres(int(saved["G"])), saved["filled_from"]
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    with open(os.path.join(out, "summary.md")) as handle:
        table = handle.read().split("**Valence and arousal read out from the students")[1]
    assert "against the ratings of the rated images (AffectNet 64)" in table
    for name, readouts in (("kd_teacher", ["class"]), ("B3", ["prototype", "class"])):
        model, config = load_student(os.path.join(run_dir, "stage3", name, "best.pt"))
        logits, embeddings = predict(model, data.images, config["input_size"], "cpu")
        values = {"class": inference.class_readout(logits, config["anchors"]),
                  "prototype": inference.prototype_readout(embeddings, *prototypes)}
        scores, rows, _, _ = read_evaluation(os.path.join(out, name, "affectnet"))
        assert scores["data"]["rated_valence_arousal"] == scores["valence_arousal"]["images"] == 64
        assert np.array([[float(row["rated_valence"]), float(row["rated_arousal"])] for row in rows]).tolist() == \
            ratings.tolist()
        assert ("valence_from_prototype" in rows[0]) == ("prototype" in readouts)
        for readout in readouts:
            written = np.array([[float(row[f"valence_from_{readout}"]), float(row[f"arousal_from_{readout}"])]
                                for row in rows])
            np.testing.assert_allclose(written, values[readout], atol=1e-5)
        assert sorted(scores["valence_arousal"]["readouts"]) == sorted(readouts)
        assert summary["results"][name]["affectnet"]["valence_arousal"] == scores["valence_arousal"]
        label = "kd_teacher (B0)" if name == "kd_teacher" else name
        for readout in readouts:
            got = scores["valence_arousal"]["readouts"][readout]
            expected = metrics.regression_metrics(values[readout], ratings)
            resampled = metrics.regression_bootstrap(values[readout], ratings, 1000, seed=0)
            for dimension in VA_DIMENSIONS:
                for score in metrics.REGRESSION_SCORES:
                    assert got[dimension][score] == pytest.approx(expected[dimension][score], abs=1e-6)
                    assert got[dimension]["interval"][score] == pytest.approx(
                        metrics.intervals(resampled[dimension])[score], abs=1e-6)
            cells = [f"{got[d]['ccc']:.2f} [{got[d]['interval']['ccc'][0]:.2f}, {got[d]['interval']['ccc'][1]:.2f}] "
                     f"(r {got[d]['pearson_r']:.2f})" for d in VA_DIMENSIONS]
            assert f"| {label} | {readout} | {cells[0]} | {cells[1]} |" in table
    scores, rows, _, _ = read_evaluation(os.path.join(out, "B3", "ckplus"))
    assert "valence_arousal" not in scores and "rated_valence" not in rows[0]  # CK+ rates no valence or arousal
    assert "valence_from_prototype" in rows[0] and "valence_from_class" in rows[0]


def test_a_run_without_rated_sets_writes_no_readout_scores(demo, tmp_path):
    """FERPlus and CK+ rate no valence or arousal: no scores, table or picture of the readouts, while predictions.csv
    still carries the readouts themselves."""
    run_dir, stage4 = demo
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("stage4"))
    stage4_eval.main(["--run-dir", copy, "--ckplus", os.path.join(copy, "data", "synthetic_ckplus_tiny_seed0"),
                      "--variants", "B3", "--bootstrap", "100", "--tsne-points", "60", "--device", "cpu"])
    out = os.path.join(copy, "stage4")
    assert not [name for name in artifacts.read_manifest(out) if "valence_arousal" in name]
    with open(os.path.join(out, "summary.md")) as handle:
        assert "Valence and arousal" not in handle.read()
    scores, rows, _, _ = read_evaluation(os.path.join(out, "B3", "ckplus"))
    assert "valence_arousal" not in scores and scores["data"]["rated_valence_arousal"] == 0
    assert {"valence_from_prototype", "valence_from_class"} <= rows[0].keys() and "rated_valence" not in rows[0]


def test_readouts_by_hand():
    """The class readout weighs the anchors by the class probabilities; the prototype readout takes the centre of the
    nearest prototype's bin, and for a bin stage 2 filled from a neighbour (bin 0, from bin 1 here), the neighbour's."""
    anchors = [(0.0, 0.0), (0.8, 0.4), (-0.7, -0.4)]
    logits = np.log(np.array([[1.0, 1.0, 2.0], [1.0, 0.0 + 1e-300, 0.0 + 1e-300]]))
    np.testing.assert_allclose(inference.class_readout(logits, anchors), [[(0.8 - 1.4) / 4, (0.4 - 0.8) / 4],
                                                                            [0.0, 0.0]], atol=1e-12)
    bank = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # G = 2; bin 0 is bin 1's
    centres = grid_centres(2)  # (-0.8, -0.8), (-0.8, 0.8), (0.8, -0.8), (0.8, 0.8)
    embeddings = np.array([[5.0, 0.1, 0.0], [0.0, 0.2, -3.0], [0.1, 0.0, 2.0], [0.0, 3.0, 2.9]])
    readout = inference.prototype_readout(embeddings, bank, centres, np.array([1, 1, 2, 3]))
    np.testing.assert_array_equal(readout, [[-0.8, 0.8], [0.8, -0.8], [0.8, 0.8], [0.8, -0.8]])


def photo_of_a_face(expression, seed):
    """A 260 x 200 photo with a 110-pixel face in it."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(place_face(rng, draw_face(rng, EXPRESSIONS[expression], "ckplus"), (200, 260), 110,
                                      "ckplus")[0])


def test_prediction_mode(demo, tmp_path, capsys):
    run_dir, _ = demo
    folder = tmp_path / "photos"
    os.makedirs(folder / "nested")
    photo_of_a_face("surprise", 3).save(folder / "nested" / "face.png")
    Image.fromarray(np.full((50, 80, 3), 90, np.uint8)).save(folder / "wall.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "._wall.jpg").write_bytes(b"\x00\x05\x16\x07 macOS's resource fork")  # hidden: left out
    os.makedirs(folder / ".thumbnails")
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(folder / ".thumbnails" / "wall.png")
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "notes.txt"):  # PIL reads no HEIC: counted and named
        (folder / "nested" / name).write_bytes(b"...")
    output = str(tmp_path / "predictions.csv")
    capsys.readouterr()
    stage4_eval.main(["--run-dir", run_dir, "--predict", str(folder), "--output", output, "--device", "cpu"])
    with open(output) as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["path"], row["found_by"]) for row in rows] == [("nested/face.png", "detected"), ("wall.jpg", "centre")]
    errors = capsys.readouterr().err.splitlines()
    skipped = [line for line in errors if line.startswith("skipped unreadable image")]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    assert ("--predict: left out 3 files that are not .jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp images: .heic 2, "
            ".txt 1") in errors
    assert [rows[1][key] for key in ("x", "y", "width", "height")] == ["15", "0", "50", "50"]
    anchors = np.array([DEFAULT_ANCHORS[name] for name in FER_CLASSES])  # the student's, as trained by default
    with np.load(os.path.join(run_dir, "stage2", "prototypes.npz")) as saved:
        bin_centres = {tuple(centre) for centre in grid_centres(int(saved["G"]))[saved["filled_from"]].round(5)}
    for row in rows:
        p = [float(row[f"p_{name}"]) for name in FER_CLASSES]
        assert sum(p) == pytest.approx(1, abs=1e-4) and row["predicted"] == FER_CLASSES[int(np.argmax(p))]
        assert [float(row["valence_from_class"]), float(row["arousal_from_class"])] == pytest.approx(
            p @ anchors, abs=1e-4)
        # B3 was trained with Proto-KD against the run's bank: its nearest prototype's bin centre
        assert (float(row["valence_from_prototype"]), float(row["arousal_from_prototype"])) in bin_centres


def test_prediction_mode_with_boxes_classifies_the_boxed_faces_only(demo, tmp_path, capsys):
    """--boxes: a row per face of the user's detector, cut from that box (not found again), numbered per image."""
    run_dir, _ = demo
    folder = tmp_path / "photos"
    os.makedirs(folder / "day1")
    photo_of_a_face("happiness", 4).save(folder / "day1" / "two.png")
    photo_of_a_face("happiness", 4).save(folder / "unlisted.png")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x,y,width,height\nday1/two.png,70,40,110,110\nday1/two.png,0,0,40,60\n")
    output = str(tmp_path / "predictions.csv")
    stage4_eval.main(["--run-dir", run_dir, "--predict", str(folder), "--boxes", str(boxes), "--output", output])
    with open(output) as handle:
        rows = [[row[key] for key in ("path", "face", "found_by", "x", "y", "width", "height")]
                for row in csv.DictReader(handle)]
    assert rows == [["day1/two.png", "0", "box", "70", "40", "110", "110"],
                    ["day1/two.png", "1", "box", "0", "0", "40", "60"]]
    assert f"2 faces in 1 images (faces from {boxes}) -> {output}" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("path,x,y,w,h\n", "lacks the columns width, height; expected path, x, y, width, height"),
    ("path,x,y,width,height\nface.png,1,2,3.5,4\n", "row 2: width must be an integer, got '3.5'"),
    ("path,x,y,width,height\nface.png,1,2,0,4\n", "row 2: face box (1, 2, 0, 4) has no area"),
    ("path,x,y,width,height\nface.png,,,,\n", "row 2: no face box (x, y, width, height are empty)"),
    ("path,x,y,width,height\nface.png,1,2,3,4\nmissing.png,1,2,3,4\n", "row 3: no image file 'missing.png' in"),
    ("path,x,y,width,height\nface.png,90,2,3,4\n", "row 2: face box (90, 2, 3, 4) lies outside the 80 x 50 image"),
    ("path,x,y,width,height\n", "no face box in it"),
])
def test_a_bad_boxes_csv_is_refused_naming_file_and_row(demo, tmp_path, text, message):
    Image.fromarray(np.full((50, 80), 90, np.uint8)).save(tmp_path / "face.png")
    (tmp_path / "boxes.csv").write_text(text)
    with pytest.raises(DatasetError) as error:
        stage4_eval.main(["--run-dir", demo[0], "--predict", str(tmp_path), "--boxes", str(tmp_path / "boxes.csv")])
    assert str(error.value).startswith(str(tmp_path / "boxes.csv")) and message in str(error.value)


def test_prediction_mode_needs_one_student(demo, tmp_path):
    run_dir, _ = demo
    with pytest.raises(ValueError,
                       match=r"--predict uses one student: name it with --variants \(found B3, kd_teacher\)"):
        stage4_eval.main(["--run-dir", run_dir, "--predict", str(tmp_path), "--variants", "B3", "kd_teacher"])


def test_latex_tables_typeset_names_literally():
    markdown, latex = report.table(["variant", "R&D_set"], [["r50 #2", "50% ✓"], ["a|b", "x"]],
                                        "names with $ and ~")
    assert r"\caption{names with \$ and \textasciitilde{}}" in latex
    assert r"variant & R\&D\_set \\" in latex and r"r50 \#2 & 50\% \checkmark \\" in latex
    assert "| r50 #2 | 50% ✓ |" in markdown and r"| a\|b | x |" in markdown


def test_too_few_bootstrap_resamples_are_refused(capsys):
    with pytest.raises(SystemExit):
        stage4_eval.parse_args(["--bootstrap", "99"])
    assert "--bootstrap at least 100" in capsys.readouterr().err


def test_prediction_mode_needs_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        stage4_eval.parse_args(["--predict", str(tmp_path / "photo.jpg")])
    assert "--predict " + str(tmp_path / "photo.jpg") + ": not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--predict", ".", "--reference", "B0"], "--reference: evaluation only, and --predict classifies"),
    (["--predict", ".", "--ckplus", "ck", "--replicates", "B3=a,b"], "--ckplus, --replicates: evaluation only"),
    (["--predict", ".", "--bootstrap", "200", "--seed", "0"], "--bootstrap, --seed: evaluation only"),
    (["--predict", ".", "--tsne-points", "50"], "--tsne-points: evaluation only"),
    (["--output", "out.csv"], "--output is for prediction mode: give it with --predict FOLDER"),
    (["--export", "s.pt2", "--boxes", "b.csv"], "--boxes is for prediction mode: give it with --predict FOLDER"),
    (["--affectnet-split", "training"], "--affectnet-split chooses the split of --affectnet FOLDER: give it with "
                                        "--affectnet"),
    (["--predict", ".", "--data-seed", "2"], "--data-seed shapes the embedded synthetic default, which --predict "
                                             "replaces: leave it out"),
    (["--export", "s.pt2", "--ckplus", "ck", "--seed", "1"], "--ckplus, --seed: --export writes one student as a "
                                                              "program and reads no images; leave them out"),
    (["--export", "s.pt2", "--predict", ".", "--skip-unreadable"], "--predict, --skip-unreadable: --export writes"),
    (["--export", "s.pt2", "--synthetic-size", "tiny"], "--synthetic-size shapes the embedded synthetic default, "
                                                         "which --export replaces"),
])
def test_flags_of_the_other_mode_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        stage4_eval.parse_args(flags)
    assert message in capsys.readouterr().err


def test_export_writes_a_program_that_gives_the_students_outputs(demo, tmp_path, capsys):
    """--export: B3, the one student chosen among two, as a torch.export program of aten operations only, which
    gives predict's outputs for any number of crops, with the metadata a program of another's needs."""
    run_dir, _ = demo
    path = str(tmp_path / "exported" / "student.pt2")
    stage4_eval.main(["--run-dir", run_dir, "--export", path])
    out = capsys.readouterr().out
    assert f"B3 -> {path} (SHA-256 {artifacts.sha256_file(path)}): a torch.export program" in out
    assert sorted(os.listdir(os.path.dirname(path))) == ["student.onnx", "student.pt2"]
    checkpoint = os.path.join(run_dir, "stage3", "B3", "best.pt")
    model, config = load_student(checkpoint)
    extra = {EXPORT_METADATA: ""}
    program = torch.export.load(path, extra_files=extra)
    metadata = json.loads(extra[EXPORT_METADATA])
    assert (metadata["student"], metadata["checkpoint_sha256"], metadata["classes"], metadata["config"]) == (
        "B3", artifacts.sha256_file(checkpoint), list(FER_CLASSES), json.loads(json.dumps(config)))
    assert "48 x 48" in metadata["input"] and metadata["note"] == inference.SYNTHETIC_NOTE
    assert {node.target.namespace for node in program.graph.nodes if node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)} == {"aten"}
    faces = np.random.default_rng(0).integers(0, 256, (6, 48, 48), dtype=np.uint8)
    for count in (1, 6):
        logits, embeddings = program.module()(torch.from_numpy(faces[:count]))
        expected_logits, expected_embeddings = predict(model, faces[:count], config["input_size"], "cpu")
        torch.testing.assert_close(logits, torch.from_numpy(expected_logits), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(embeddings, torch.from_numpy(expected_embeddings), rtol=1e-5, atol=1e-5)
    # with torch alone: importing ngd_ext or torchvision fails in this process
    alone = subprocess.run([sys.executable, "-c", (
        "import sys; sys.modules['ngd_ext'] = sys.modules['torchvision'] = None; import torch; "
        f"print(*torch.export.load({path!r}).module()(torch.zeros(3, 48, 48, dtype=torch.uint8))[1].shape)")],
        capture_output=True, text=True, cwd=str(tmp_path))
    assert (alone.returncode, alone.stdout) == (0, f"3 {config['embedding_size']}\n"), alone.stderr
    check_onnx_model(path.replace(".pt2", ".onnx"), out, model, config, metadata, faces)


def check_onnx_model(path, out, model, config, metadata, faces):
    """The ONNX model beside the program: onnxruntime gives predict's outputs, and it carries the same metadata."""
    import onnx
    import onnxruntime

    assert f"B3 -> {path} (SHA-256 {artifacts.sha256_file(path)}): the same as an ONNX model" in out
    props = {prop.key: prop.value for prop in onnx.load(path).metadata_props}
    assert json.loads(props[EXPORT_METADATA]) == metadata
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits, embeddings = session.run(["logits", "embeddings"], {"faces": faces})
    expected_logits, expected_embeddings = predict(model, faces, config["input_size"], "cpu")
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(embeddings, expected_embeddings, rtol=1e-4, atol=1e-4)


def test_export_without_the_onnx_packages_writes_the_program_and_says_why_not_the_onnx_model(
        demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inference, "onnx_available", lambda: False)
    path = str(tmp_path / "student.pt2")
    stage4_eval.main(["--run-dir", demo[0], "--export", path])
    assert os.listdir(tmp_path) == ["student.pt2"]
    assert ("no ONNX model written: it needs the packages onnx, onnxscript, onnxruntime (pip install -r "
            "requirements-dev.txt)") in capsys.readouterr().err


def add_variant(run_dir, name, state_dict, config):
    folder = os.path.join(run_dir, "stage3", name)
    os.makedirs(folder)
    torch.save({"state_dict": state_dict, "config": config}, os.path.join(folder, "best.pt"))
    artifacts.write_manifest(folder)


def test_refused_checkpoints(demo):
    run_dir, stage4 = demo
    checkpoint = torch.load(os.path.join(run_dir, "stage3", "B3", "best.pt"), weights_only=True)
    config = checkpoint["config"]
    add_variant(run_dir, "seven", Student("resnet18", 7, config["embedding_size"]).state_dict(), config)
    with pytest.raises(ValueError, match=r"seven/best.pt: not a stage-3 checkpoint of an 8-class student \(its "
                                         r"classifier has 7 outputs\)"):
        stage4_eval.main([*stage4, "--variants", "seven"])
    add_variant(run_dir, "r50", Student("resnet50", 8, config["embedding_size"]).state_dict(), config)
    with pytest.raises(ValueError, match=r"r50/best.pt: its weights are not those of the resnet18 student"):
        stage4_eval.main([*stage4, "--variants", "r50"])
    add_variant(run_dir, "other_bank", checkpoint["state_dict"], {**config, "prototypes_sha256": "0" * 64})
    with pytest.raises(artifacts.ArtifactError, match=r"other_bank/best.pt was trained against another prototype bank"):
        stage4_eval.main([*stage4, "--variants", "other_bank"])
    add_variant(run_dir, "tampered", checkpoint["state_dict"], config)
    with open(os.path.join(run_dir, "stage3", "tampered", "best.pt"), "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(artifacts.ArtifactError, match=r"tampered/best.pt does not match SHA256SUMS"):
        stage4_eval.main([*stage4, "--variants", "tampered"])


def test_a_failed_run_leaves_the_previous_results(demo, monkeypatch):
    run_dir, stage4 = demo
    out = os.path.join(run_dir, "stage4")
    before = artifacts.read_manifest(out)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed half-way through the pictures

    monkeypatch.setattr(stage4_eval, "plot_prototype_occupancy", fail)
    with pytest.raises(KeyboardInterrupt):
        stage4_eval.main([*stage4, "--variants", "B3"])
    assert artifacts.read_manifest(out) == before
    artifacts.verify_manifest(out, sorted(before))
    assert not [name for name in os.listdir(run_dir) if ".tmp-" in name or ".old-" in name]


def test_prediction_needs_no_prototype_bank(demo, tmp_path, capsys):
    """A student copied alone, or into a run with another bank, predicts all the same, with the class readout of
    valence and arousal but not the prototype readout, and a note saying why."""
    run_dir, _ = demo
    run = tmp_path / "run"
    shutil.copytree(os.path.join(run_dir, "stage3", "B3"), run / "stage3" / "B3")
    rng = np.random.default_rng(4)
    frame, _ = place_face(rng, draw_face(rng, EXPRESSIONS["anger"], "ckplus"), (200, 260), 110, "ckplus")
    os.makedirs(tmp_path / "photos")
    Image.fromarray(frame).save(tmp_path / "photos" / "a.png")
    predict = ["--run-dir", str(run), "--predict", str(tmp_path / "photos"), "--device", "cpu"]
    capsys.readouterr()
    stage4_eval.main(predict)
    assert f"--predict: no prototype readout, as {run}/stage2/ holds no prototypes.npz" in capsys.readouterr().err
    with open(run / "predictions" / "B3.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["path"], row["face"], row["found_by"]) for row in rows] == [("a.png", "0", "detected")]
    assert "valence_from_class" in rows[0] and "valence_from_prototype" not in rows[0]
    shutil.copytree(os.path.join(run_dir, "stage1"), run / "stage1")
    stage2_prototypes.main(["--run-dir", str(run), "--grid", "3", "--min-count", "1"])  # another bank
    stage4_eval.main(predict)
    assert (f"--predict: no prototype readout, as {run}/stage2/prototypes.npz is not the bank the student was trained "
            "against") in capsys.readouterr().err
    with open(run / "predictions" / "B3.csv") as handle:
        assert "valence_from_prototype" not in next(csv.DictReader(handle))


def test_another_reference_student(demo, tmp_path):
    """--reference B3: the difference table compares kd_teacher with B3, by the same paired resamples, so each
    difference and interval is the default's with the sign turned."""
    run_dir, stage4 = demo
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("stage4"))
    stage4_eval.main([*stage4, "--run-dir", copy, "--variants", "kd_teacher", "B3", "--reference", "B3"])
    summaries = []
    for folder in (run_dir, copy):
        with open(os.path.join(folder, "stage4", "summary.json")) as handle:
            summaries.append(json.load(handle))
    default, reversed_ = summaries
    assert (default["differences_from"], reversed_["differences_from"]) == ("kd_teacher", "B3")
    assert list(reversed_["differences"]) == ["kd_teacher"]
    for key in DATASETS:
        forward = default["differences"]["B3"][key]["eight_way"]
        backward = reversed_["differences"]["kd_teacher"][key]["eight_way"]
        assert backward["macro_f1"] == pytest.approx(-forward["macro_f1"], abs=1e-12)
        low, high = forward["interval"]["macro_f1"]
        assert backward["interval"]["macro_f1"] == pytest.approx([-high, -low], abs=1e-12)
    with open(os.path.join(copy, "stage4", "summary.md")) as handle:
        assert "**Difference from B3: 8-way macro-F1, in points" in handle.read()


def test_an_unknown_reference_student_is_refused(demo):
    run_dir, stage4 = demo
    with pytest.raises(ValueError, match=r"^--reference B2: not one of the students evaluated \(kd_teacher, B3\)$"):
        stage4_eval.main([*stage4, "--variants", "kd_teacher", "B3", "--reference", "B2"])


def test_students_of_several_seeds_share_their_training_faces(tmp_path):
    """Students of several --seed values share the FERPlus they were trained on: one real copy, or on the embedded
    default the faces of one --data-seed. Students of two data seeds have no FERPlus to share."""
    def config(source, seed, ferplus=None, data_seed=0):
        return {"source": source, "ferplus": ferplus, "synthetic_size": "tiny", "seed": seed, "data_seed": data_seed}

    real = [config("real", seed, "/data/FERPlus") for seed in (0, 1, 2)]
    assert stage4_eval.training_ferplus(real, str(tmp_path)) == "/data/FERPlus"
    with pytest.raises(ValueError, match="trained on different FERPlus data .*/data/FERPlus, /data/other"):
        stage4_eval.training_ferplus([*real, config("real", 0, "/data/other")], str(tmp_path))
    with pytest.raises(ValueError, match=r"synthetic_ferplus_tiny_seed0, .*synthetic_ferplus_tiny_seed1\); give "
                                         r"--ferplus"):
        stage4_eval.training_ferplus([config("synthetic", 0), config("synthetic", 0, data_seed=1)], str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "data"))  # nothing written for a refused set of students
    folder = stage4_eval.training_ferplus([config("synthetic", seed, data_seed=3) for seed in (0, 1)], str(tmp_path))
    assert folder == os.path.join(tmp_path, "data", "synthetic_ferplus_tiny_seed3")
    assert os.path.isfile(os.path.join(folder, "fer2013new.csv"))  # written again, as it was missing
    before_data_seed = {key: value for key, value in config("synthetic", 4).items() if key != "data_seed"}
    assert stage4_eval.training_ferplus([before_data_seed], str(tmp_path)).endswith("synthetic_ferplus_tiny_seed4")


def test_replicates_summarise_students_of_several_seeds(demo, tmp_path):
    """Two more B0 students of seeds 1 and 2 beside kd_teacher (B0, seed 0), trained on the same synthetic faces, and
    B3 students of seeds 1 and 2 beside B3 (seed 0), each taught by its seed's B0: --replicates gives each group's
    mean and standard deviation, from the scores each student has alone, and so for their V/A readouts on AffectNet;
    and B3's differences from B0 seed by seed."""
    run_dir, stage4 = demo
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("stage4"))
    for seed in (1, 2):
        stage3_student.main(["--run-dir", copy, "--variant", "B0", "--name", f"B0_seed{seed}", "--seed", str(seed),
                             *TINY3])
        stage3_student.main(["--run-dir", copy, "--variant", "B3", "--name", f"B3_seed{seed}", "--seed", str(seed),
                             "--kd-teacher", os.path.join(copy, "stage3", f"B0_seed{seed}", "best.pt"), *TINY3])
    students = ["kd_teacher", "B0_seed1", "B0_seed2"]
    configs = [torch.load(os.path.join(copy, "stage3", name, "best.pt"), weights_only=True)["config"]
               for name in students]
    assert len({config["data_key"] for config in configs}) == 1 and len({config["seed"] for config in configs}) == 3
    stage4_eval.main([*stage4, "--run-dir", copy, "--variants", *students, "B3", "B3_seed1", "B3_seed2",
                      "--replicates", "B0=kd_teacher,B0_seed1,B0_seed2", "--replicates", "B3=B3_seed2,B3,B3_seed1",
                      "--bootstrap", "100"])
    with open(os.path.join(copy, "stage4", "summary.json")) as handle:
        summary = json.load(handle)
    group = summary["replicates"]["B0"]
    assert (group["students"], group["seeds"]) == (students, [0, 1, 2])
    assert set(group["datasets"]) == set(DATASETS)
    scores = [summary["results"][name]["ferplus_test"]["eight_way"]["macro_f1"] for name in students]
    assert len(set(scores)) > 1  # three seeds, three students
    spread = group["datasets"]["ferplus_test"]["eight_way"]["macro_f1"]
    assert spread["values"] == scores
    assert spread["mean"] == pytest.approx(np.mean(scores), abs=1e-12)
    assert spread["sd"] == pytest.approx(np.std(scores, ddof=1), abs=1e-12)
    ccc = [summary["results"][name]["affectnet"]["valence_arousal"]["readouts"]["class"]["arousal"]["ccc"]
           for name in students]
    va_spread = group["datasets"]["affectnet"]["valence_arousal"]
    assert list(va_spread) == ["class"] and va_spread["class"]["arousal"]["ccc"]["values"] == ccc  # B0: no prototype
    assert va_spread["class"]["arousal"]["ccc"]["sd"] == pytest.approx(np.std(ccc, ddof=1), abs=1e-12)
    with open(os.path.join(copy, "stage4", "summary.md")) as handle:
        markdown = handle.read()
    table = markdown.split("**Across training seeds: 8-way macro-F1 (%), mean ± standard deviation (n - 1)")[1]
    valid = group["datasets"]["ferplus_valid"]["eight_way"]["macro_f1"]
    assert (f"| B0 | 0, 1, 2 | {100 * valid['mean']:.1f} ± {100 * valid['sd']:.1f} | "
            f"{100 * spread['mean']:.1f} ± {100 * spread['sd']:.1f} |") in table
    # the default reference, the first B0 student in the tables (B0_seed1), makes B0 the group B3 is compared with
    assert summary["differences_from"] == "B0_seed1" and list(summary["paired_across_seeds"]) == ["B3"]
    paired = summary["paired_across_seeds"]["B3"]
    assert (paired["from"], paired["seeds"]) == ("B0", [0, 1, 2])
    for key in DATASETS:
        b0, b3 = ([summary["results"][name][key]["eight_way"]["macro_f1"] for name in names]
                  for names in (students, ["B3", "B3_seed1", "B3_seed2"]))
        assert paired["datasets"][key]["eight_way"]["macro_f1"]["values"] == pytest.approx(
            np.subtract(b3, b0).tolist(), abs=1e-12)
    assert [key for key in DATASETS if "valence_arousal" in paired["datasets"][key]] == ["affectnet"]  # the rated set
    assert list(paired["datasets"]["affectnet"]["valence_arousal"]) == ["class"]  # the readout B0 has too
    test_difference = paired["datasets"]["ferplus_test"]["eight_way"]["macro_f1"]
    low, high = test_difference["interval"]
    assert markdown.split("**Paired by training seed: each group's 8-way macro-F1 minus that of B0's student of the "
                          "same seed")[1].count(
        f"| B3 | 0, 1, 2 | {100 * paired['datasets']['ferplus_valid']['eight_way']['macro_f1']['mean']:+.1f}") == 1
    assert (f"{100 * test_difference['mean']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], "
            f"{test_difference['above_zero']} of 3 above 0 |") in markdown
    # what KD did, seed by seed: each B3's agreement with its own B0 teacher, against another seed's B0's
    mechanisms = summary["mechanisms"]
    for name, teacher in (("B3", "kd_teacher"), ("B3_seed1", "B0_seed1"), ("B3_seed2", "B0_seed2")):
        entry = mechanisms[name]["ferplus_test"]
        # the reference, B0_seed1, where it is not the teacher; else the first other B0 in the tables' order
        assert entry["teacher"] == teacher and entry["baseline"] == ("B0_seed2" if teacher == "B0_seed1" else
                                                                     "B0_seed1")
    across = summary["mechanisms_across_seeds"]
    assert (across["B3"]["preset"], across["B3"]["from"], across["B0"]["from"]) == ("B3", None, None)  # no B2 group
    gain = across["B3"]["datasets"]["ferplus_test"]["agreement_gain"]
    assert gain["values"] == [mechanisms[name]["ferplus_test"]["agreement_gain"]["difference"]
                              for name in ("B3_seed2", "B3", "B3_seed1")]  # in the group's order
    assert "agreement_gain" not in across["B0"]["datasets"]["ferplus_test"]
    with open(os.path.join(copy, "stage4", "summary.tex")) as handle:
        assert r"$\pm$" in handle.read()
    assert "replicates.png" in artifacts.read_manifest(os.path.join(copy, "stage4"))
    assert Image.open(os.path.join(copy, "stage4", "replicates.png")).size[0] > 300


def test_groups_are_compared_seed_by_seed_with_a_t_interval():
    """Each group minus the reference group, paired by seed value whatever the order the students were named in; the
    mean and interval those of scipy's paired t-test; the V/A readouts both groups have; a group sharing one seed
    with the reference left out."""
    rng = np.random.default_rng(0)

    def spread(seeds):
        return {"values": rng.uniform(0.3, 0.7, len(seeds)).tolist()}

    def group(seeds, readouts=("class",)):
        on_dataset = {protocol: {score: spread(seeds) for score in SCORES} for protocol in PROTOCOLS}
        on_dataset["valence_arousal"] = {readout: {dimension: {score: spread(seeds) for score in REGRESSION_SCORES}
                                                   for dimension in VA_DIMENSIONS} for readout in readouts}
        return {"seeds": seeds, "datasets": {"ferplus_test": on_dataset}}

    replicates = {"B0": group([0, 1, 2]), "B3": group([2, 0, 1], ("prototype", "class")), "B1": group([1, 0]),
                  "B2": group([0, 7])}
    paired = metrics.paired_across_seeds(replicates, "B0")
    assert list(paired) == ["B3", "B1"]
    assert (paired["B3"]["from"], paired["B3"]["seeds"], paired["B1"]["seeds"]) == ("B0", [0, 1, 2], [0, 1])
    for group_name, order in (("B3", [1, 2, 0]), ("B1", [1, 0])):  # where seeds 0, 1, 2 stand in the group
        for protocol in PROTOCOLS:
            for score in SCORES:
                mine = np.array(replicates[group_name]["datasets"]["ferplus_test"][protocol][score]["values"])[order]
                theirs = np.array(replicates["B0"]["datasets"]["ferplus_test"][protocol][score]["values"])[:len(order)]
                got = paired[group_name]["datasets"]["ferplus_test"][protocol][score]
                assert got["values"] == pytest.approx(mine - theirs, abs=1e-15)
                assert got["mean"] == pytest.approx(np.mean(mine - theirs), abs=1e-15)
                assert got["sd"] == pytest.approx(np.std(mine - theirs, ddof=1), abs=1e-15)
                assert got["above_zero"] == int((mine > theirs).sum())
                assert got["interval"] == pytest.approx(list(scipy.stats.ttest_rel(mine, theirs).confidence_interval(
                    0.95)), abs=1e-12)
    va = paired["B3"]["datasets"]["ferplus_test"]["valence_arousal"]
    assert list(va) == ["class"]  # B0 has no prototype readout to compare with
    mine, theirs = (np.array(replicates[name]["datasets"]["ferplus_test"]["valence_arousal"]["class"]["arousal"]["ccc"][
        "values"]) for name in ("B3", "B0"))
    assert va["class"]["arousal"]["ccc"]["values"] == pytest.approx(mine[[1, 2, 0]] - theirs, abs=1e-15)
    assert metrics.paired_across_seeds({"B0": group([0, 1]), "B3": group([2, 3])}, "B0") == {}


def fake_students(**differences):
    """Students as stage 4 holds them ({name: (model, config, hash)}): B3 of seeds 0, 1 and 2 trained alike on a real
    copy, each config changed by differences[name] (a dict)."""
    base = {"source": "real", "ferplus": "/data/FERPlus", "variant": "B3", "lr": 2e-4, "data_key": "d0",
            "world_size": 1, "amp": "auto", "kd_teacher": "runs/real/stage3/kd/best.pt"}
    return {name: (None, {**base, "name": name, "seed": seed, **differences.get(name, {})}, "")
            for seed, name in enumerate(("s0", "s1", "s2"))}


def test_replicates_must_be_trained_alike_with_different_seeds():
    check = stage4_eval.check_replicates
    group = [("B3", ["s0", "s1", "s2"])]
    run_differently = {"s1": {"world_size": 4, "amp": "bf16", "kd_teacher": "runs/real/stage3/kd_seed1/best.pt"}}
    assert check(group, fake_students(**run_differently)) == {"B3": ["s0", "s1", "s2"]}
    with pytest.raises(ValueError, match=r"^--replicates B3: its students were not trained alike: lr is 0.0002 in s0, "
                                         r"0.0002 in s1, 0.001 in s2 \(only the seed"):
        check(group, fake_students(s2={"lr": 1e-3}))
    with pytest.raises(ValueError, match="not trained alike: data_key is 'd0' in s0, 'd1' in s1"):  # the copy changed
        check(group, fake_students(s1={"data_key": "d1"}))
    other_copy = {"ferplus": "/data/FERPlus-2", "class_weights": [0.25 + i / 3 for i in range(8)]}
    with pytest.raises(ValueError, match=r"trained alike: class_weights is None in s0, None in s1, \[0.25, "
                                         r"0.5833333333333333, 0.91666666\.\.\. in s2; ferplus is '/data/FERPlus' in "
                                         r"s0, '/data/FERPlus' in s1, '/data/FERPlus-2' in s2 \(only the seed"):
        check(group, fake_students(s2=other_copy))
    synthetic = {"source": "synthetic", "ferplus": None, "data_seed": 0}
    assert check(group, fake_students(s0=synthetic, s1=synthetic, s2=synthetic))
    with pytest.raises(ValueError, match=r"trained alike: data_key is 'd0' in s0, 'd1' in s1, 'd0' in s2; data_seed "
                                         r"is 0 in s0, 1 in s1, 0 in s2 \(only the seed"):
        check(group, fake_students(s0=synthetic, s1={**synthetic, "data_seed": 1, "data_key": "d1"}, s2=synthetic))
    with pytest.raises(ValueError, match=r"^--replicates B3: seeds 0 \(s0\), 0 \(s1\), 2 \(s2\): replicates need"):
        check(group, fake_students(s1={"seed": 0}))
    with pytest.raises(ValueError, match=r"^--replicates B3: s9 is not one of the students evaluated \(s0, s1, s2\)$"):
        check([("B3", ["s0", "s9"])], fake_students())
    with pytest.raises(ValueError, match=r"^--replicates other: s1 is already in --replicates B3$"):
        check([("B3", ["s0", "s1"]), ("other", ["s1", "s2"])], fake_students())
    with pytest.raises(ValueError, match=r"^--replicates B3: named twice$"):
        check([("B3", ["s0", "s1"]), ("B3", ["s2", "s3"])], fake_students())


@pytest.mark.parametrize("spec", ["B3=s0", "B3=s0,s0", "=s0,s1", "s0,s1"])
def test_malformed_replicates_are_refused(spec, capsys):
    with pytest.raises(SystemExit):
        stage4_eval.parse_args(["--replicates", spec])
    assert f"argument --replicates: {spec!r}: expected GROUP=NAME,NAME,... with at least two" in capsys.readouterr().err
