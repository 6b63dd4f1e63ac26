"""The training benchmark times stage 3's own step; torch.compile changes neither stage 3's losses (to float32's
tolerance) nor its files, and a compiled run resumes without it."""

import copy
import json
import os
import sys

import pytest
import torch

import stage3_student
from ngd_ext.data.synthetic_faces import write_synthetic_ferplus
from ngd_ext.student_model import load_student
from test_stage3 import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_training  # noqa: E402


def test_the_benchmarks_step_is_stage_3s_step_and_loss(tmp_path):
    """Its B3 step: stage 3's augmentation of the batch, its StudentLoss over the student's and the teacher's outputs
    (every term acting: KD, Proto-KD, and D-Geo at the ramp's end)."""
    step = bench_training.Stage3Step("B3", "resnet18", 48, 16, "cpu", run_dir=str(tmp_path))
    x = step.batches.network_input(step.batch(0), 0, 48)
    labels = step.batches.labels[step.batch(0)]
    logits, z = copy.deepcopy(step.model)(x)
    with torch.no_grad():
        teacher_logits = step.teacher[0](x)[0]
    expected = step.loss_fn(logits, z, labels, teacher_logits, epoch=0)
    assert step.loss_fn.weights(0) == {"ce": 1.0, "kd": 0.3, "proto_kd": 0.12, "var_cap": 0.012, "margin": 0.012}
    assert step.run(0) == pytest.approx({term: value.item() for term, value in expected.items()}, rel=1e-6)


def test_the_benchmark_writes_its_table_and_json(tmp_path, capsys):
    out = str(tmp_path / "bench.json")
    bench_training.main(["--device", "cpu", "--size", "32", "--batch", "8", "--steps", "1", "--rounds", "1",
                         "--warmup", "1", "--out", out])
    with open(out) as handle:
        report = json.load(handle)
    assert [row["variant"] for row in report["rows"]] == ["plain", "B0", "B3"]
    assert set(report["rows"][2]["parts_ms"]) == {"augment", "student fwd+bwd", "teacher fwd", "fused op", "optimizer"}
    assert set(report["goals"][0]) == {"arch", "size", "compile", "b0_over_plain", "b3_overhead_beyond_teacher"}
    assert "resnet18 at 32 px: B0 at" in capsys.readouterr().out


def test_compiled_and_eager_students_give_the_same_losses(tmp_path):
    """Two steps of B3 (student and teacher compiled): the same loss terms, so the same first update too."""
    eager, compiled = (bench_training.Stage3Step("B3", "resnet18", 48, 16, "cpu", compile=flag, run_dir=str(tmp_path))
                       for flag in (False, True))
    assert isinstance(compiled.trained, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled.teacher[0], torch._dynamo.eval_frame.OptimizedModule)
    for i in range(2):
        assert compiled.run(i) == pytest.approx(eager.run(i), rel=1e-4, abs=1e-6)


def test_a_compiled_run_resumes_without_compile_and_saves_plain_checkpoints(run_with_bank, monkeypatch, capsys,
                                                                            tmp_path):
    ferplus = str(tmp_path / "ferplus")
    write_synthetic_ferplus(ferplus, seed=0, train=64, valid=32, test=32)
    # the shapes of the test above, whose compiled graphs torch's cache then serves
    arguments = ["--run-dir", run_with_bank, "--variant", "B0", "--ferplus", ferplus, "--epochs", "1", "--device",
                 "cpu", "--checkpoint-every", "1", "--batch-size", "16", "--input-size", "48", "--name", "compiled"]
    steps, augment = [], stage3_student.augment

    def killed_at_the_second_step(*args, **kwargs):
        steps.append(None)
        if len(steps) == 2:  # after step 1's checkpoint
            raise KeyboardInterrupt
        return augment(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(stage3_student, "augment", killed_at_the_second_step)
        with pytest.raises(KeyboardInterrupt):
            stage3_student.main([*arguments, "--compile"])
    killed = torch.load(os.path.join(run_with_bank, "stage3", "compiled.partial", "checkpoint.pt"), weights_only=True)
    assert killed["config"]["compile"] is True and not any("_orig_mod" in key for key in killed["model"])
    stage3_student.main([*arguments, "--resume"])
    assert "resuming at epoch 1, step 1" in capsys.readouterr().out
    for name in ("best.pt", "last.pt"):
        model, config = load_student(os.path.join(run_with_bank, "stage3", "compiled", name))
        assert config["compile"] is False and not any("_orig_mod" in key for key in model.state_dict())
