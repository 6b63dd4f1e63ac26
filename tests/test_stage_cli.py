"""The interface every stage shares (SPEC section 7): --run-dir, --device and --seed, and a --help that explains
every flag."""

import argparse

import pytest

import stage1_teacher
import stage2_prototypes
import stage3_student
import stage4_eval

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
