"""Stage 3: losses, presets, and the student trained end to end on the tiny synthetic default."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stage2_prototypes
import stage3_student
from helpers import kill_process_tree, run_under_gloo
from ngd_ext import artifacts
from ngd_ext.distributed import gather_rows
from ngd_ext.ferplus import FerPlusError
from ngd_ext.student_model import Student, load_student
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
    assert (real.epochs, real.ramp_start, real.ramp_end, real.input_size) == (100, 20, 60, 224)  # the official release's
    args = stage3_student.parse_args(["--kd-teacher", "t.pt", "--kd-loss", "kl", "--kd-temperature", "1",
                                      "--class-weights", "1,2,3,4,5,6,7,8.5", "--input-size", "112"])
    assert (args.kd_temperature, args.class_weights, args.input_size) == (1.0, [1, 2, 3, 4, 5, 6, 7, 8.5], 112)


@pytest.mark.parametrize("flags, message", [
    (["--class-weights", "1,2,3"], "argument --class-weights: '1,2,3': expected one of sqrt-inverse, inverse, none, or 8 "
                                   "comma-separated numbers (neutral, happiness, surprise, sadness, anger, disgust, fear, "
                                   "contempt); got 3"),
    (["--class-weights", "1,1,1,1,1,1,1,-1"], "argument --class-weights: '-1': expected a finite number >= 0"),
    (["--class-weights", "1,1,1,1,1,1,1,nan"], "argument --class-weights: 'nan': expected a finite number"),
    (["--class-weights", "sqrt"], "argument --class-weights: 'sqrt': expected one of sqrt-inverse, inverse, none"),
    (["--kd-teacher", "t.pt", "--kd-temperature", "2"], "--kd-temperature 2: --kd-loss mse matches the raw logits, with "
                                                        "no temperature; give --kd-loss kl"),
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
    """stage3_student.augment written as a loop over the images, each cropped and erased by slicing."""
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
    batched = stage3_student.augment(images, torch.Generator().manual_seed(size), size)
    looped = augment_image_by_image(images, torch.Generator().manual_seed(size), size)
    assert batched.shape == (40, 1, size, size)
    torch.testing.assert_close(batched, looped, rtol=0, atol=0)
    assert (batched == 0).flatten(1).sum(1).ge((size // 4) ** 2).sum() >= 5  # erased squares (0.5 -> 0) are there


def test_augment_gives_each_ddp_process_its_share_of_the_batch():
    images = torch.randint(0, 256, (30, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    whole = stage3_student.augment(images, torch.Generator().manual_seed(3), 48)
    for rank in range(3):
        share = stage3_student.augment(images, torch.Generator().manual_seed(3), 48, part=slice(rank, None, 3))
        torch.testing.assert_close(share, whole[rank::3], rtol=0, atol=0)


def test_augment_draws_the_same_images_at_every_size():
    """One seed at 96 and at 48 pixels: the 96-pixel images, averaged down to 48, are the 48-pixel ones but for the
    interpolation (measured: 0.004 mean difference, against 0.12 for another seed)."""
    blurred = F.avg_pool2d(torch.rand(16, 1, 52, 52, generator=torch.Generator().manual_seed(6)) * 255, 5, stride=1)
    images = blurred[:, 0].to(torch.uint8)  # smooth, so that sampling at two resolutions can agree
    large = F.avg_pool2d(stage3_student.augment(images, torch.Generator().manual_seed(7), 96), 2)
    small = stage3_student.augment(images, torch.Generator().manual_seed(7), 48)
    other = stage3_student.augment(images, torch.Generator().manual_seed(8), 48)
    assert (large - small).abs().mean() < 0.1 * (other - small).abs().mean()


@needs_gpu
def test_augment_on_a_gpu_matches_the_cpu():
    images = torch.randint(0, 256, (64, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    on_cpu = stage3_student.augment(images, torch.Generator().manual_seed(5), 64, part=slice(1, None, 2))
    on_gpu = stage3_student.augment(images.cuda(), torch.Generator().manual_seed(5), 64, part=slice(1, None, 2))
    assert on_gpu.device.type == "cuda"
    # The sampling points and bilinear weights round another way there; a wrong crop, flip or square is off by ~1.
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=2e-3)


def test_augment_stays_on_the_images_device():
    """The meta device stands in for a GPU: an operation that mixed a CPU tensor into the batch's would fail."""
    images = torch.empty((16, 48, 48), dtype=torch.uint8, device="meta")
    x = stage3_student.augment(images, torch.Generator().manual_seed(0), 64, part=slice(1, None, 2))
    assert (x.shape, x.device, x.dtype) == ((8, 1, 64, 64), torch.device("meta"), torch.float32)


def test_sync_bn_needs_cuda_and_keeps_the_checkpoint_format(capsys):
    with pytest.raises(SystemExit):
        stage3_student.parse_args(["--variant", "B0", "--sync-bn", "--device", "cpu"])
    assert "--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on 'cpu')" in capsys.readouterr().err
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(Student("resnet18", 8, 16))
    assert sum(isinstance(module, torch.nn.SyncBatchNorm) for module in synced.modules()) == 20
    Student("resnet18", 8, 16).load_state_dict(synced.state_dict())  # stage 4 reads its best.pt as a plain student


@pytest.fixture(scope="module")
def run_with_bank(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    write_stage1(run_dir, count=400)
    stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])
    return run_dir


def test_b0_then_b3_with_its_kd_teacher(run_with_bank, capsys):
    run_dir = run_with_bank
    stage3_student.main(["--run-dir", run_dir, "--variant", "B0", "--name", "teacher", *TINY])
    teacher = os.path.join(run_dir, "stage3", "teacher", "best.pt")
    stage3_student.main(["--run-dir", run_dir, "--variant", "B3", "--kd-teacher", teacher, *TINY])
    assert "barely acts" not in capsys.readouterr().err  # D-Geo's ramp starts later: not judged in epoch 1
    out = os.path.join(run_dir, "stage3", "B3")
    names = {"best.pt", "history.jsonl", "curves.png", "config.json"}
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
    loss_terms, computed = stage3_student.loss_terms, []

    def poisoned_at_step_3(*arguments):
        values = loss_terms(*arguments)
        computed.append(values)
        if len(computed) == 3:
            values["kd"] = values["kd"] + float("nan")
            values["total"] = values["total"] + values["kd"]
        return values

    monkeypatch.setattr(stage3_student, "loss_terms", poisoned_at_step_3)
    with pytest.raises(FloatingPointError, match=r"^epoch 1, step 2: the loss is not finite; stopping before"):
        stage3_student.main(["--run-dir", run_with_bank, "--variant", "B2", "--kd-weight", "0", "--name", "poisoned",
                             *TINY])
    assert len(computed) == 3
    assert not os.path.exists(os.path.join(run_with_bank, "stage3", "poisoned", artifacts.MANIFEST))
    assert not os.path.exists(os.path.join(run_with_bank, "stage3", "poisoned", "best.pt"))


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("processes", [1, 2])
def test_resume_after_kill_ends_with_the_same_weights(run_with_bank, processes):
    """A run killed (with all its processes) after its first checkpoint and resumed ends with the weights of a run
    never killed, bit for bit: in one process, and in 2 under torchrun (gloo)."""
    ports = iter(range(29620 + 10 * processes, 29630 + 10 * processes))

    def command(name, *extra):
        launcher = [sys.executable]
        if processes > 1:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                         "--master_port", str(next(ports))]
        return launcher + [os.path.join(ROOT, "stage3_student.py"), "--run-dir", run_with_bank, "--variant", "B2",
                           "--kd-weight", "0", "--checkpoint-every", "2", *TINY, "--name", name, *extra]

    environment = {**os.environ, "OMP_NUM_THREADS": "1"} if processes > 1 else None  # 2 processes on 2 cores
    straight, killed = f"straight{processes}", f"killed{processes}"
    subprocess.run(command(straight), check=True, capture_output=True, cwd=ROOT, env=environment)
    checkpoint = os.path.join(run_with_bank, "stage3", f"{killed}.partial", "checkpoint.pt")
    process = subprocess.Popen(command(killed), cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(checkpoint) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    kill_process_tree(process.pid)
    process.wait()
    assert os.path.exists(checkpoint), "the run ended before its first checkpoint"
    assert not os.path.exists(os.path.join(run_with_bank, "stage3", killed, artifacts.MANIFEST))
    resumed = subprocess.run(command(killed, "--resume"), check=True, capture_output=True, text=True, cwd=ROOT,
                             env=environment)
    assert "resuming at epoch 1, step" in resumed.stdout
    expected = weights(os.path.join(run_with_bank, "stage3", straight, "best.pt"))
    actual = weights(os.path.join(run_with_bank, "stage3", killed, "best.pt"))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_run_resumes_in_another_number_of_processes(run_with_bank, monkeypatch):
    """A job killed on one machine may come back with fewer or more GPUs: the checkpoint of a run in one process
    continues in two under torchrun, where the other settings are the same."""
    arguments = ["--run-dir", run_with_bank, "--variant", "B2", "--kd-weight", "0", *TINY, "--name", "moved"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage3_student, "predict", killed)  # at the end of the first epoch, after step 6's checkpoint
    with pytest.raises(KeyboardInterrupt):
        stage3_student.main([*arguments, "--checkpoint-every", "3"])
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                              "29650", os.path.join(ROOT, "stage3_student.py"), *arguments, "--resume",
                              "--checkpoint-every", "2"], check=True, capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "resuming at epoch 1, step 6, in 2 processes where the checkpoint's run had 1" in resumed.stdout
    out = os.path.join(run_with_bank, "stage3", "moved")
    assert "best.pt" in artifacts.read_manifest(out)
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["config"]["world_size"] == 2


def test_mixed_precision_by_device():
    cpu = torch.device("cpu")
    assert [stage3_student.mixed_precision(choice, cpu) for choice in ("auto", "bf16", "fp16", "off")] == [
        None, torch.bfloat16, torch.float16, None]


def test_a_first_step_skipped_by_the_float16_scaler_sets_off_no_scheduler_warning(recwarn):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = stage3_student.gradient_scaler(torch.device("cpu"), torch.float16)
    scaler.scale((weight * 1e36).sum()).backward()  # finite, but not once scaled by 65536
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    assert scaler.get_scale() == 32768.0 and weight.detach().tolist() == [1.0, 1.0, 1.0]  # the step was skipped
    assert [str(warning.message) for warning in recwarn] == []


def test_float16_training_keeps_its_gradient_scaler_across_a_resume(run_with_bank, monkeypatch, capsys):
    """--amp fp16 (meant for GPUs without bfloat16, run here on the CPU): a gradient scaler scales the loss, skipping
    the steps whose gradients overflow, and lowering its scale then; a killed run continues with the scaler's state,
    and so ends with the weights of a run never killed (with the scale reset, it would skip other steps). The
    history records the scale."""
    arguments = ["--run-dir", run_with_bank, "--variant", "B2", "--kd-weight", "0", *TINY, "--amp", "fp16",
                 "--class-weights", "inverse",  # its steep weights overflow float16 in the first steps, as needed
                 "--checkpoint-every", "2", "--batch-size", "128", "--input-size", "16"]  # float16 is slow on a CPU
    stage3_student.main([*arguments, "--name", "straight_fp16"])
    with open(os.path.join(run_with_bank, "stage3", "straight_fp16", "history.jsonl")) as handle:
        (entry,) = [json.loads(line) for line in handle]
    assert entry["loss_scale"] < 65536.0

    steps = []

    def killed_at_the_third_step(*args, **kwargs):
        steps.append(None)
        if len(steps) == 3:  # after step 2's checkpoint
            raise KeyboardInterrupt
        return augment(*args, **kwargs)

    augment = stage3_student.augment
    with monkeypatch.context() as patch:
        patch.setattr(stage3_student, "augment", killed_at_the_third_step)
        with pytest.raises(KeyboardInterrupt):
            stage3_student.main([*arguments, "--name", "killed_fp16"])
    checkpoint = torch.load(os.path.join(run_with_bank, "stage3", "killed_fp16.partial", "checkpoint.pt"),
                            weights_only=True)
    assert checkpoint["config"]["precision"] == "torch.float16"
    assert checkpoint["scaler"]["scale"] < 65536.0  # it began there, and an overflow has lowered it since
    stage3_student.main([*arguments, "--name", "killed_fp16", "--resume"])
    assert "resuming at epoch 1, step 2" in capsys.readouterr().out
    expected, actual = (weights(os.path.join(run_with_bank, "stage3", name, "best.pt"))
                        for name in ("straight_fp16", "killed_fp16"))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_two_gloo_processes_match_one_process(run_with_bank):
    """DDP over 2 CPU processes against 1 process with the same global batch, for the full loss (B3 without KD, D-Geo
    at full weight from the first step). Both see the same augmented images and take every loss term over the whole
    global batch, so they train alike; not identically, as BatchNorm's statistics are taken per process (half the
    batch each). Measured: each epoch's mean loss terms agree within 0.3%, the margin within 2%. Stated tolerances:
    1%, and 5% for the margin; with the loss taken per process (each over its half), the first epoch's margin was 33%
    lower, as half a batch's class means lie further apart."""
    histories = {}
    for processes in (1, 2):
        name = f"ddp{processes}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                        "--master_port", str(29600 + processes), os.path.join(ROOT, "stage3_student.py"),
                        "--run-dir", run_with_bank, "--variant", "B3", "--kd-weight", "0", "--ramp-start", "0",
                        "--ramp-end", "0", "--name", name, "--synthetic-size", "tiny", "--epochs", "2",
                        "--batch-size", "64", "--device", "cpu"],
                       check=True, capture_output=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(os.path.join(run_with_bank, "stage3", name, "history.jsonl")) as handle:
            histories[processes] = [json.loads(line) for line in handle]
    assert [epoch["dgeo_ramp"] for epoch in histories[1]] == [1.0, 1.0]
    for one, two in zip(histories[1], histories[2], strict=True):
        for term, tolerance in (("total", 0.01), ("ce", 0.01), ("proto_kd", 0.01), ("margin", 0.05)):
            assert two["train"][term] == pytest.approx(one["train"][term], rel=tolerance), (one["epoch"], term)


def ddp_loss_problem():
    """A batch, a linear 'student' whose outputs are the logits and the embeddings, a KD teacher's logits, and the loss
    settings: every term on, Proto-KD and D-Geo weighted as much as CE so that their gradients show."""
    generator = torch.Generator().manual_seed(0)
    batch, features, embedding, classes = 32, 12, 6, 8
    torch.manual_seed(0)
    model = torch.nn.Linear(features, classes + embedding)
    inputs = torch.randn(batch, features, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    teacher_logits = torch.randn(batch, classes, generator=generator)
    constants = stage3_student.LossConstants(
        class_weights=torch.rand(classes, generator=generator) + 0.5,
        protos=torch.randn(25, embedding, generator=generator),
        target_table=torch.softmax(torch.randn(classes, 25, generator=generator), dim=1),
        positive=torch.arange(classes) % 3 == 1)
    args = stage3_student.parse_args(["--variant", "B3", "--kd-teacher", "unused.pt", "--proto-weight", "1",
                                      "--dgeo-weight", "1", "--margin", "1.5", "--kd-loss", "kl"])
    return model, inputs, labels, teacher_logits, constants, args


def ddp_loss_worker(rank, world):
    """One process of a DDP run of stage 3's loss: its share of the batch, the gathered global batch, backward."""
    model, inputs, labels, teacher_logits, constants, args = ddp_loss_problem()
    trained = torch.nn.parallel.DistributedDataParallel(model)
    part = slice(rank, None, world)
    outputs = gather_rows(trained(inputs[part]))
    teacher = gather_rows(teacher_logits[part])
    y = labels[stage3_student.gathered_order(torch.arange(len(labels)), world)]
    values = stage3_student.loss_terms(outputs[:, :8], outputs[:, 8:], y, y, teacher, 1.0, args, constants)
    values["total"].backward()
    return {"values": {term: value.item() for term, value in values.items()},
            "grads": {name: p.grad for name, p in model.named_parameters()}}


def test_ddp_loss_is_the_one_process_loss(tmp_path):
    """Under DDP every process takes the loss over the gathered global batch, so its terms, D-Geo's class statistics
    and CE's class-weighted mean among them, are those of one process, and so is the gradient after DDP's average.
    Taken per process instead (each over its half), the D-Geo and CE gradients would differ at first order."""
    model, inputs, labels, teacher_logits, constants, args = ddp_loss_problem()
    outputs = model(inputs)
    expected = stage3_student.loss_terms(outputs[:, :8], outputs[:, 8:], labels, labels, teacher_logits, 1.0, args,
                                         constants)
    expected["total"].backward()
    assert min(expected[term].item() for term in ("kd", "proto_kd", "var_cap", "margin")) > 0.1  # every term acts

    for rank, result in enumerate(run_under_gloo(ddp_loss_worker, tmp_path)):
        for term, value in expected.items():
            assert result["values"][term] == pytest.approx(value.item(), rel=1e-5), (rank, term)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


@needs_gpu
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_the_student_trains_on_gpus_under_torchrun(run_with_bank, amp):
    """B3 on CUDA under torchrun, on up to 2 GPUs (NCCL), with SyncBatchNorm: the GPU path of the training loop (data
    on the device, mixed precision, channels_last, the fused op's CUDA kernels, the gathered loss), in the GPU's own
    precision and in float16 with a gradient scaler. One epoch must end with finite loss terms and a best.pt that
    stage 4 loads as a plain student."""
    processes, name = min(2, torch.cuda.device_count()), f"gpus_{amp}"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                          "--master_port", "29610", os.path.join(ROOT, "stage3_student.py"), "--run-dir",
                          run_with_bank, "--variant", "B3", "--kd-weight", "0", "--ramp-start", "0", "--ramp-end", "0",
                          "--sync-bn", "--amp", amp, "--name", name, *TINY[:-2], "--device", "cuda"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    with open(os.path.join(run_with_bank, "stage3", name, "history.jsonl")) as handle:
        (epoch,) = [json.loads(line) for line in handle]
    assert all(math.isfinite(value) for value in epoch["train"].values()), epoch["train"]
    assert epoch["train"]["margin"] > 0 and epoch["dgeo_ramp"] == 1.0
    _, config = load_student(os.path.join(run_with_bank, "stage3", name, "best.pt"))
    half = amp == "fp16" or torch.cuda.get_device_capability() < (8, 0)
    assert config["precision"] == ("torch.float16" if half else "torch.bfloat16")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_gpu)], ids=["cpu", "gpu"])
def test_a_deterministic_run_repeats_bit_for_bit(run_with_bank, device):
    """--deterministic: two runs of B3 (D-Geo at full weight, so every loss term trains) end with the same weights, bit
    for bit. On a GPU this holds only with deterministic cuDNN and cuBLAS algorithms, and any op of the training step
    that has none stops the run, naming itself. Each run is a process of its own: cuBLAS reads its workspace setting
    once per process."""
    for name in ("deterministic_a", "deterministic_b"):
        subprocess.run([sys.executable, os.path.join(ROOT, "stage3_student.py"), "--run-dir", run_with_bank,
                        "--variant", "B3", "--kd-weight", "0", "--ramp-start", "0", "--ramp-end", "0",
                        "--deterministic", "--name", name, *TINY[:-2], "--device", device],
                       check=True, capture_output=True, cwd=ROOT)
    first, second = (weights(os.path.join(run_with_bank, "stage3", name, "best.pt"))
                     for name in ("deterministic_a", "deterministic_b"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=key)
