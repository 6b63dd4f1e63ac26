"""The README and docs/ as rendered Markdown: the two opening commands, links that resolve, whole tables; and the
README's example of the loss in a training loop of one's own, run."""

import glob
import os
import re

import pytest

from ngd_ext.emotions import FER_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def prose_lines(page):
    """(line number, line) of a Markdown page outside its fenced code blocks."""
    with open(os.path.join(ROOT, page)) as handle:
        lines = handle.read().splitlines()
    fenced = False
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line
    assert not fenced, f"{page}: a code fence is never closed"


def test_readme_opens_with_the_two_commands():
    with open(os.path.join(ROOT, "README.md")) as handle:
        opening = handle.read().split("\n\n", 2)[1]
    lines = opening.splitlines()
    assert lines[0] == "```bash" and lines[-1] == "```" and len(lines) == 4
    assert [line.split("#")[0].split() for line in lines[1:3]] == [["bash", "scripts/demo.sh"],
                                                                   ["bash", "scripts/test.sh"]]
    assert all(os.path.exists(os.path.join(ROOT, script)) for script in ("scripts/demo.sh", "scripts/test.sh"))


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_and_pictures_exist(page):
    missing = []
    for number, line in prose_lines(page):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            path = target.split("#")[0]
            if path and "://" not in path and not os.path.exists(os.path.join(ROOT, os.path.dirname(page), path)):
                missing.append(f"line {number}: {target}")
    assert not missing, f"{page}: {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_tables_have_a_header_and_whole_rows(page):
    """A table is a header row, a separator row of dashes, then rows with the header's number of cells."""
    def cells(line):
        return len(re.sub(r"`[^`]*`", "code", line).strip().strip("|").split("|"))

    problems, table = [], []
    for number, line in [*prose_lines(page), (None, "")]:
        if line.startswith("|"):
            table.append((number, line))
            continue
        if table:
            (first, header), *rest = table
            if not rest or not re.fullmatch(r"\|( *:?-+:? *\|)+", rest[0][1]):
                problems.append(f"line {first}: a table without a header row and a separator")
            problems += [f"line {n}: {cells(row)} cells, the header has {cells(header)}"
                         for n, row in rest if cells(row) != cells(header)]
            table = []
    assert not problems, f"{page}: {problems}"


def code_blocks(language):
    """The fenced code blocks of a language on every page."""
    blocks = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as handle:
            blocks += re.findall(rf"^```{language}\n(.*?)^```$", handle.read(), flags=re.S | re.M)
    return blocks


def test_the_readme_example_of_the_loss_in_ones_own_training_runs(tmp_path, monkeypatch):
    """It trains on a small FERPlus against a stage-2 bank, and its criterion is the fused op's terms plus CE."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    import ngd_ext
    from ngd_ext import artifacts
    from ngd_ext.data.synthetic_faces import write_synthetic_ferplus

    (example,) = [block for block in code_blocks("python") if "StudentLoss" in block]
    stage2 = tmp_path / "runs" / "demo" / "stage2"
    stage2.mkdir(parents=True)
    bank = np.random.default_rng(0).normal(size=(25, 16)).astype(np.float32)
    np.savez(stage2 / "prototypes.npz", bank=bank / np.linalg.norm(bank, axis=1, keepdims=True), G=5,
             filled_from=np.arange(25))
    artifacts.write_manifest(str(stage2))
    write_synthetic_ferplus(str(tmp_path / "data" / "FERPlus"), seed=0, train=160, valid=16, test=16)
    monkeypatch.chdir(tmp_path)
    forward, inputs = ngd_ext.StudentLoss.forward, []
    monkeypatch.setattr(ngd_ext.StudentLoss, "forward", lambda self, *args, **kwargs: inputs.append(args) or
                        forward(self, *args, **kwargs))
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    losses, (logits, z, labels) = names["losses"], inputs[-1]
    assert names["proto_dgeo"].embedding_dim == 16 and len(labels) == len(names["loader"].dataset) % 64
    proto_kd, var_cap, margin = ngd_ext.proto_dgeo_loss(z, names["proto_dgeo"].protos, names["proto_dgeo"].target,
                                                        labels, names["proto_dgeo"].positive, 0.9)
    ce = F.cross_entropy(logits, labels, label_smoothing=0.055)
    torch.testing.assert_close(losses["total"], ce + 0.12 * proto_kd)  # epoch 1: D-Geo's ramp has not begun
    assert losses["kd"] == 0 and losses["margin"] == margin and losses["var_cap"] == var_cap


def test_the_readme_example_of_prediction_from_python_runs(tmp_path, monkeypatch, capsys):
    import numpy as np
    import torch
    from PIL import Image

    from ngd_ext import artifacts
    from ngd_ext.student_model import Student
    from ngd_ext.data.synthetic_faces import EXPRESSIONS, draw_face, place_face

    (example,) = [block for block in code_blocks("python") if "load_student" in block]
    student = tmp_path / "runs" / "demo" / "stage3" / "B3"
    student.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"state_dict": Student("resnet18", 8, 16).state_dict(),
                "config": {"arch": "resnet18", "embedding_size": 16, "input_size": 48}}, student / "best.pt")
    artifacts.write_manifest(str(student))
    rng = np.random.default_rng(3)
    frame, _ = place_face(rng, draw_face(rng, EXPRESSIONS["surprise"], "ckplus"), (200, 260), 110, "ckplus")
    Image.fromarray(frame).convert("RGB").save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    printed = capsys.readouterr().out.splitlines()
    assert names["logits"].shape == (len(names["faces"]), 8) and names["embeddings"].shape == (len(printed), 16)
    assert printed[0].startswith("detected (") and printed[0].split()[-1] in FER_CLASSES


def test_the_readme_example_of_the_exported_program_runs(tmp_path, monkeypatch):
    import torch

    from ngd_ext.student_model import Student, export_student

    (example,) = [block for block in code_blocks("python") if "torch.export.load" in block]
    torch.manual_seed(0)
    export_student(Student("resnet18", 8, 16), {"input_size": 32}, str(tmp_path / "student.pt2"), {})
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    assert names["probabilities"].shape == (2, 8) and names["embeddings"].shape == (2, 16)
    torch.testing.assert_close(names["probabilities"].sum(dim=1), torch.ones(2))


def test_the_readme_is_a_front_page():
    """At most 250 lines, and no history in prose: no commit hashes (results that change are data under docs/)."""
    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    assert len(text.splitlines()) <= 250
    assert not re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)
