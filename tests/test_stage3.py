"""Stage 3: its settings and refusals, the augmentation, and the student trained on the tiny synthetic default with
and without a KD teacher (test_stage3_runs.py: resumed, in float16, in several processes)."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stage2_prototypes
import stage3_student
from ngd_ext import artifacts
from ngd_ext.augment import augment
from ngd_ext.data.ferplus import FerPlusError
from ngd_ext.student_loss import StudentLoss
from ngd_ext.student_model import Student
from test_ferplus import write_csv_layout
from test_prototypes import write_stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--synthetic-size", "tiny", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [stage3_student.learning_rate_factor(step, 4, 12) for step in (0, 3, 4, 8, 11, 12)]
    assert factors == pytest.approx([0.25, 1.0, 1.0, 0.5, (1 + np.cos(np.pi * 7 / 8)) / 2, 0.0], abs=1e-15)
    assert stage3_student.learning_rate_factor(0, 0, 10) == 1.0  # --warmup-epochs 0


def test_presets_and_overrides():
    args = stage3_student.parse_args(["--variant", "B2", "--kd-teacher", "t.pt", "--proto-weight", "0.5"])
    assert (args.kd_weight, args.proto_weight, args.dgeo_weight) == (0.30, 0.5, 0.0)
    assert (args.epochs, args.ramp_start, args.ramp_end, args.input_size) == (6, 1, 4, 48)  # the synthetic schedule
    assert (args.kd_loss, args.kd_temperature, args.class_weights) == ("mse", 5.0, "sqrt-inverse")
    real = stage3_student.parse_args(["--variant", "B0", "--ferplus", "x"])
    # the official release's schedule on FERPlus
    assert (real.epochs, real.ramp_start, real.ramp_end, real.input_size) == (100, 20, 60, 224)
    args = stage3_student.parse_args(["--kd-teacher", "t.pt", "--kd-loss", "kl", "--kd-temperature", "1",
                                      "--class-weights", "1,2,3,4,5,6,7,8.5", "--input-size", "112"])
    assert (args.kd_temperature, args.class_weights, args.input_size) == (1.0, [1, 2, 3, 4, 5, 6, 7, 8.5], 112)


@pytest.mark.parametrize("flags, message", [
    (["--class-weights", "1,2,3"], "argument --class-weights: '1,2,3': expected one of sqrt-inverse, inverse, none, "
                                   "or 8 comma-separated numbers (neutral, happiness, surprise, sadness, anger, "
                                   "disgust, fear, contempt); got 3"),
    (["--class-weights", "1,1,1,1,1,1,1,-1"], "argument --class-weights: '-1': expected a finite number >= 0"),
    (["--class-weights", "1,1,1,1,1,1,1,nan"], "argument --class-weights: 'nan': expected a finite number"),
    (["--class-weights", "sqrt"], "argument --class-weights: 'sqrt': expected one of sqrt-inverse, inverse, none"),
    (["--kd-teacher", "t.pt", "--kd-temperature", "2"],
     "--kd-temperature 2: --kd-loss mse matches the raw logits, with no temperature; give --kd-loss kl"),
    (["--kd-teacher", "t.pt", "--kd-loss", "kl", "--kd-temperature", "0"],
     "argument --kd-temperature: '0': expected a finite number > 0"),
])
def test_loss_settings_that_cannot_be_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        stage3_student.parse_args(flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--tau", "0", "argument --tau: '0': expected a finite number > 0"),
    ("--margin", "-1", "argument --margin: '-1': expected a finite number >= 0"),
    ("--checkpoint-every", "0", "--checkpoint-every must be at least 1"),
    ("--batch-size", "1", "--batch-size at least 2 (BatchNorm needs two images per step)"),
])
def test_settings_out_of_range_are_refused(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        stage3_student.parse_args(["--variant", "B0", flag, value])
    assert message in capsys.readouterr().err


def test_each_process_takes_an_equal_share_of_two_images_at_least():
    stage3_student.check_batch_share(8, 4)
    for batch_size, world in ((6, 4), (4, 4)):
        with pytest.raises(ValueError, match=rf"^--batch-size {batch_size} must divide among the 4 processes, at least "
                                             r"2 images each \(BatchNorm needs two per step in every process\)$"):
            stage3_student.check_batch_share(batch_size, world)


def test_kd_variant_without_teacher_is_refused(capsys):
    with pytest.raises(SystemExit):
        stage3_student.parse_args(["--variant", "B3"])
    assert "--variant B3 uses logit KD (weight 0.3): give --kd-teacher" in capsys.readouterr().err


@pytest.mark.parametrize("flags, why", [(["--variant", "B0"], "--variant B0"),
                                        (["--variant", "B3", "--kd-weight", "0"], "--variant B3, --kd-weight 0")])
def test_kd_teacher_without_kd_is_refused(capsys, flags, why):
    """A teacher, or a KD loss, that the loss would not use is refused, not recorded in the student's config."""
    with pytest.raises(SystemExit):
        stage3_student.parse_args([*flags, "--kd-teacher", "t.pt"])
    assert (f"--kd-teacher t.pt: the logit-KD weight is 0 ({why}), so the teacher would go unused; leave it out, or "
            "give a positive --kd-weight" in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        stage3_student.parse_args([*flags, "--kd-loss", "kl"])
    assert (f"--kd-loss kl: the logit-KD weight is 0 ({why}), so the KD loss would go unused; leave it out, or give a "
            "positive --kd-weight" in capsys.readouterr().err)
    assert stage3_student.parse_args(flags).kd_loss == "mse"
    assert stage3_student.parse_args(["--kd-teacher", "t.pt", "--kd-loss", "kl"]).kd_loss == "kl"


def augment_image_by_image(images, generator, size):
    """ngd_ext.augment.augment written as a loop over the images, each cropped and erased by slicing."""
    n = len(images)
    offsets = torch.randint(0, 9, (n, 2), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(20)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    erase = torch.rand(n, generator=generator) < 0.25
    corners = (torch.rand(n, 2, generator=generator) * size * 0.75).long()
    out = []
    for i in range(n):
        padded = torch.nn.functional.pad(images[i:i + 1].float().div(255).unsqueeze(1), (4, 4, 4, 4), mode="replicate")
        x = padded[:, :, offsets[i, 0]:offsets[i, 0] + 48, offsets[i, 1]:offsets[i, 1] + 48]
        if flip[i]:
            x = x.flip(-1)
        cos, sin = torch.cos(angle[i]) / scale[i], torch.sin(angle[i]) / scale[i]
        theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
        grid = torch.nn.functional.affine_grid(theta, (1, 1, size, size), align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
        if erase[i]:
            x[:, :, corners[i, 0]:corners[i, 0] + size // 4, corners[i, 1]:corners[i, 1] + size // 4] = 0.5
        out.append((x - 0.5) / 0.25)
    return torch.cat(out)


@pytest.mark.parametrize("size", [48, 64])
def test_augment_matches_a_loop_over_images(size):
    images = torch.randint(0, 256, (40, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batched = augment(images, torch.Generator().manual_seed(size), size)
    looped = augment_image_by_image(images, torch.Generator().manual_seed(size), size)
    assert batched.shape == (40, 1, size, size)
    torch.testing.assert_close(batched, looped, rtol=0, atol=0)
    assert (batched == 0).flatten(1).sum(1).ge((size // 4) ** 2).sum() >= 5  # erased squares (0.5 -> 0) are there


def test_augment_gives_each_ddp_process_its_share_of_the_batch():
    images = torch.randint(0, 256, (30, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = augment(images, torch.Generator().manual_seed(3), 48)
    for rank in range(3):
        share = augment(images, torch.Generator().manual_seed(3), 48, part=slice(rank, None, 3))
        torch.testing.assert_close(share, whole[rank::3], rtol=0, atol=0)


def test_augment_draws_the_same_images_at_every_size():
    """One seed at 96 and at 48 pixels: the 96-pixel images, averaged down to 48, are the 48-pixel ones but for the
    interpolation (measured: 0.004 mean difference, against 0.12 for another seed)."""
    blurred = F.avg_pool2d(torch.rand(16, 1, 52, 52, generator=torch.Generator().manual_seed(6)) * 255, 5, stride=1)
    images = blurred[:, 0].to(torch.uint8)  # smooth, so that sampling at two resolutions can agree
    large = F.avg_pool2d(augment(images, torch.Generator().manual_seed(7), 96), 2)
    small = augment(images, torch.Generator().manual_seed(7), 48)
    other = augment(images, torch.Generator().manual_seed(8), 48)
    assert (large - small).abs().mean() < 0.1 * (other - small).abs().mean()


@needs_gpu
def test_augment_on_a_gpu_matches_the_cpu():
    images = torch.randint(0, 256, (64, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    on_cpu = augment(images, torch.Generator().manual_seed(5), 64, part=slice(1, None, 2))
    on_gpu = augment(images.cuda(), torch.Generator().manual_seed(5), 64, part=slice(1, None, 2))
    assert on_gpu.device.type == "cuda"
    # The sampling points and bilinear weights round another way there; a wrong crop, flip or square is off by ~1.
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=2e-3)


def test_augment_stays_on_the_images_device():
    """The meta device stands in for a GPU: an operation that mixed a CPU tensor into the batch's would fail."""
    images = torch.empty((16, 48, 48), dtype=torch.uint8, device="meta")
    x = augment(images, torch.Generator().manual_seed(0), 64, part=slice(1, None, 2))
    assert (x.shape, x.device, x.dtype) == ((8, 1, 64, 64), torch.device("meta"), torch.float32)


def test_sync_bn_needs_cuda_and_keeps_the_checkpoint_format(capsys):
    with pytest.raises(SystemExit):
        stage3_student.parse_args(["--variant", "B0", "--sync-bn", "--device", "cpu"])
    assert "--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on 'cpu')" in capsys.readouterr().err
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(Student("resnet18", 8, 16))
    assert sum(isinstance(module, torch.nn.SyncBatchNorm) for module in synced.modules()) == 20
    Student("resnet18", 8, 16).load_state_dict(synced.state_dict())  # stage 4 reads its best.pt as a plain student


def test_b0_then_b3_with_its_kd_teacher(run_with_bank, capsys):
    run_dir = run_with_bank
    stage3_student.main(["--run-dir", run_dir, "--variant", "B0", "--name", "teacher", *TINY])
    teacher = os.path.join(run_dir, "stage3", "teacher", "best.pt")
    stage3_student.main(["--run-dir", run_dir, "--variant", "B3", "--kd-teacher", teacher, *TINY])
    assert "barely acts" not in capsys.readouterr().err  # D-Geo's ramp starts later: not judged in epoch 1
    out = os.path.join(run_dir, "stage3", "B3")
    names = {"best.pt", "last.pt", "history.jsonl", "curves.png", "config.json"}
    assert set(artifacts.read_manifest(out)) == names
    artifacts.verify_manifest(out, sorted(names))
    with open(os.path.join(out, "history.jsonl")) as handle:
        (epoch,) = [json.loads(line) for line in handle]
    assert epoch["train"]["kd"] > 0 and epoch["train"]["proto_kd"] > 0 and epoch["dgeo_ramp"] == 0.0
    weights = {"ce": 1.0, "kd": 0.3, "proto_kd": 0.12, "var_cap": 0.0, "margin": 0.0}
    assert epoch["weighted"] == {term: pytest.approx(weight * epoch["train"][term]) for term, weight in weights.items()}
    assert set(epoch["gradient_share"]) == {"kd", "proto_kd"} and epoch["gradient_share"]["kd"] > 0.01
    assert epoch["weighted"]["kd"] > 0.01 * epoch["weighted"]["ce"]  # logit KD acts, even from a teacher of one epoch
    assert set(epoch["valid"]) == {"accuracy", "macro_f1", "balanced_accuracy"}
    checkpoint = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert checkpoint["config"]["prototypes_sha256"] == artifacts.sha256_file(
        os.path.join(run_dir, "stage2", "prototypes.npz"))
    assert checkpoint["config"]["kd_teacher_sha256"] == artifacts.sha256_file(teacher)
    with open(os.path.join(run_dir, "stage3", "data_summary.json")) as handle:
        summary = json.load(handle)
    assert summary["source"] == "synthetic"
    assert sum(summary["train"]["per_class"].values()) == summary["train"]["images"]


def test_a_term_of_near_zero_weight_is_named_on_stderr(run_with_bank, capsys):
    stage3_student.main(["--run-dir", run_with_bank, "--variant", "B2", "--kd-weight", "0", "--proto-weight", "1e-5",
                         "--name", "faint", *TINY])
    err = capsys.readouterr().err
    assert "warning: proto_kd barely acts: in epoch 1, at weight 1e-05, it was 0.00% of CE by value" in err
    assert err.count("barely acts") == 1


def test_a_kd_teacher_of_another_input_size_sees_the_students_images_at_its_own(run_with_bank, monkeypatch):
    """A B0 teacher trained at 32 pixels, a B1 student at 48: every step augments the batch twice with the same
    draws, at 48 for the student and at 32 for the teacher, and the teacher sees only the 32-pixel images."""
    run_dir = run_with_bank
    stage3_student.main(["--run-dir", run_dir, "--variant", "B0", "--name", "teacher32", "--input-size", "32", *TINY])
    augmented, teacher_inputs = [], []
    augment, load_teacher = stage3_student.augment, stage3_student.load_teacher

    def recording_augment(images, generator, size, part=slice(None)):
        augmented.append((generator.initial_seed(), size))
        return augment(images, generator, size, part)

    def recording_teacher(path, device):
        model, size, sha256 = load_teacher(path, device)
        model.register_forward_pre_hook(lambda module, inputs: teacher_inputs.append(tuple(inputs[0].shape)))
        return model, size, sha256

    monkeypatch.setattr(stage3_student, "augment", recording_augment)
    monkeypatch.setattr(stage3_student, "load_teacher", recording_teacher)
    stage3_student.main(["--run-dir", run_dir, "--variant", "B1", "--name", "student48", "--kd-teacher",
                         os.path.join(run_dir, "stage3", "teacher32", "best.pt"), *TINY])
    steps = len(teacher_inputs)
    assert steps > 0 and set(teacher_inputs) == {(64, 1, 32, 32)}
    assert len(augmented) == 2 * steps
    assert augmented == [(seed, size) for seed, _ in augmented[::2] for size in (48, 32)]
    assert len({seed for seed, _ in augmented}) == steps


def test_kd_teacher_of_another_architecture_is_refused(run_with_bank, tmp_path):
    path = str(tmp_path / "teacher.pt")
    torch.save({"state_dict": Student("resnet18", 7, 32).state_dict(),
                "config": {"arch": "resnet18", "embedding_size": 32}}, path)
    artifacts.write_manifest(str(tmp_path))
    with pytest.raises(ValueError, match=r"--kd-teacher .*teacher.pt: not a stage-3 checkpoint of an 8-class student"):
        stage3_student.main(["--run-dir", run_with_bank, "--variant", "B1", "--kd-teacher", path, *TINY])


def test_kd_teacher_is_checked_against_its_runs_manifest(run_with_bank, tmp_path):
    path = str(tmp_path / "best.pt")
    arguments = ["--run-dir", run_with_bank, "--variant", "B1", "--kd-teacher", path, *TINY]
    with pytest.raises(artifacts.ArtifactError, match=r"^--kd-teacher .*best.pt: no such file \(expected another "
                                                      r"stage-3 run's best.pt\)"):
        stage3_student.main(arguments)
    torch.save({"state_dict": Student("resnet18", 8, 32).state_dict(),
                "config": {"arch": "resnet18", "embedding_size": 32}}, path)
    with pytest.raises(artifacts.ArtifactError, match=r"^--kd-teacher: .*SHA256SUMS is missing"):
        stage3_student.main(arguments)
    artifacts.write_manifest(str(tmp_path))
    with open(path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(artifacts.ArtifactError, match=r"^--kd-teacher: .*best.pt does not match SHA256SUMS"):
        stage3_student.main(arguments)


def test_tampered_bank_is_refused(tmp_path):
    run_dir = str(tmp_path)
    write_stage1(run_dir, count=200)
    stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])
    with open(os.path.join(run_dir, "stage2", "prototypes.npz"), "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(artifacts.ArtifactError, match=r"prototypes.npz does not match SHA256SUMS"):
        stage3_student.main(["--run-dir", run_dir, "--variant", "B0", *TINY])


@pytest.mark.parametrize("usage, what", [("Training", "training"), ("PublicTest", "validation")])
def test_a_split_with_no_usable_image_stops_the_run_before_training(run_with_bank, monkeypatch, tmp_path, usage, what):
    """Every image of the split dropped by the majority rule (here: unknown): refused at once, not after an epoch."""
    rng = np.random.default_rng(0)
    unknown, happy = [0, 0, 0, 0, 0, 0, 0, 0, 10, 0], [0, 9, 0, 0, 0, 0, 0, 0, 1, 0]
    rows = [(split, f"fer{i}{n}.png", unknown if split == usage else happy, rng.integers(0, 256, (48, 48)))
            for i, split in enumerate(("Training", "PublicTest", "PrivateTest")) for n in range(70)]
    write_csv_layout(str(tmp_path), rows)
    monkeypatch.setattr(stage3_student, "training_step", None)  # never reached
    with pytest.raises(FerPlusError, match=rf"^{tmp_path}: no {what} image is left after the label rule"):
        stage3_student.main(["--run-dir", run_with_bank, "--variant", "B0", "--name", "empty", "--ferplus",
                             str(tmp_path), "--epochs", "1", "--batch-size", "64", "--device", "cpu"])


def test_a_non_finite_loss_stops_the_run_at_its_step(run_with_bank, monkeypatch):
    """SPEC section 4: a non-finite loss (on a GPU, what a non-finite z gives) stops stage 3 at once, naming the step,
    and leaves no output that looks finished."""
    forward, computed = StudentLoss.forward, []

    def poisoned_at_step_3(*arguments, **keywords):
        values = forward(*arguments, **keywords)
        computed.append(values)
        if len(computed) == 3:
            values["kd"] = values["kd"] + float("nan")
            values["total"] = values["total"] + values["kd"]
        return values

    monkeypatch.setattr(StudentLoss, "forward", poisoned_at_step_3)
    with pytest.raises(FloatingPointError, match=r"^epoch 1, step 2: the loss is not finite; stopping before"):
        stage3_student.main(["--run-dir", run_with_bank, "--variant", "B2", "--kd-weight", "0", "--name", "poisoned",
                             *TINY])
    assert len(computed) == 3
    assert not os.path.exists(os.path.join(run_with_bank, "stage3", "poisoned", artifacts.MANIFEST))
    assert not os.path.exists(os.path.join(run_with_bank, "stage3", "poisoned", "best.pt"))
