"""The interface every stage shares (SPEC section 7): --run-dir, --device and --seed, and a --help that explains
every flag; and --data-seed, which draws the embedded default of the stages that read data."""

import argparse
import os

import pytest

import stage1_teacher
import stage2_prototypes
import stage3_student
import stage4_eval
from ngd_ext.data.synthetic_faces import write_synthetic_ferplus

STAGES = [stage1_teacher, stage2_prototypes, stage3_student, stage4_eval]


def stage_parser(stage, monkeypatch):
    """The parser a stage's parse_args builds, caught before it parses anything."""
    built = []

    def catch(parser, args=None, namespace=None):
        built.append(parser)
        raise SystemExit

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        stage.parse_args([])
    return built[0]


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.__name__)
def test_help_explains_every_flag(stage, monkeypatch):
    parser = stage_parser(stage, monkeypatch)
    assert [action.option_strings for action in parser._actions if not action.help] == []
    assert {"--run-dir", "--device", "--seed", "--help"} <= set(parser._option_string_actions)


class Drawn(Exception):
    """Raised in place of writing a synthetic set: its arguments are all that the test needs."""


def test_data_seed_alone_draws_the_embedded_default(monkeypatch, tmp_path):
    """--seed seeds training (stages 1 and 3) or the bootstrap (stage 4); the embedded default's data are drawn by
    --data-seed, so that students of several seeds learn from the same data."""
    def draw(*args, **kwargs):
        raise Drawn(args)

    run_dir = str(tmp_path)
    monkeypatch.setattr(stage1_teacher, "ensure_synthetic_eeg", draw)
    with pytest.raises(Drawn) as drawn:
        stage1_teacher.main(["--run-dir", run_dir, "--seed", "5", "--data-seed", "2", "--device", "cpu"])
    assert drawn.value.args[0] == (os.path.join(run_dir, "data", "synthetic_eeg"), 2)
    monkeypatch.setattr(stage3_student, "synthetic_ferplus", draw)
    with pytest.raises(Drawn) as drawn:
        stage3_student.main(["--run-dir", run_dir, "--variant", "B0", "--seed", "5", "--data-seed", "3",
                             "--synthetic-size", "tiny", "--device", "cpu"])
    assert drawn.value.args[0] == (run_dir, "tiny", 3)
    ferplus = str(tmp_path / "ferplus")
    write_synthetic_ferplus(ferplus, seed=0, train=8, valid=8, test=8)
    monkeypatch.setattr(stage4_eval, "write_synthetic_ckplus", draw)
    args = stage4_eval.parse_args(["--run-dir", run_dir, "--seed", "5", "--data-seed", "4", "--synthetic-size", "tiny"])
    args.ferplus = ferplus  # the students' training faces, which stage 4 would otherwise find through their configs
    with pytest.raises(Drawn) as drawn:
        stage4_eval.load_datasets(args, [], embedded=True)
    assert drawn.value.args[0] == (os.path.join(run_dir, "data", "synthetic_ckplus_tiny_seed4"), 4)


@pytest.mark.parametrize("stage, needed, arguments, message", [
    (stage1_teacher, [], ["--dreamer", "DREAMER.mat", "--data-seed", "1"],
     "--data-seed shapes the embedded synthetic default, which --dreamer replaces: leave it out"),
    (stage3_student, ["--variant", "B0"], ["--ferplus", "FERPlus", "--synthetic-size", "tiny", "--data-seed", "0"],
     "--synthetic-size and --data-seed shape the embedded synthetic default, which --ferplus replaces: leave them out"),
    (stage4_eval, [], ["--ckplus", "CK+", "--manifest", "faces.csv", "--synthetic-size", "demo"],
     "--synthetic-size shapes the embedded synthetic default, which --ckplus and --manifest replace: leave it out"),
], ids=["stage1", "stage3", "stage4"])
def test_synthetic_flags_beside_a_dataset_flag_are_refused(stage, needed, arguments, message, capsys):
    with pytest.raises(SystemExit):
        stage.parse_args([*needed, *arguments])
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")
    args = stage.parse_args([*needed, "--data-seed", "3"])
    assert (args.synthetic_size, args.data_seed) == ("demo", 3)
