"""Nothing lost, whatever the user types or the machine does: run names that cannot escape their folder, one writer per
stage folder, a stage-3 rerun that keeps the previous student until the new one is whole, a folder swap that survives
a kill at any step, and one clear line for every failure a user can cause or meet."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import stage1_teacher
import stage2_prototypes
import stage3_student
import stage4_eval
from helpers import kill_process_tree
from ngd_ext import artifacts
from ngd_ext.student_loss import StudentLoss
from test_prototypes import write_stage1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--synthetic-size", "tiny", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]


def snapshot(folder):
    """{path: SHA-256} of every file under folder, and every folder's path (to None)."""
    tree = {}
    for root, folders, files in os.walk(folder):
        tree.update({os.path.relpath(os.path.join(root, name), folder): None for name in folders})
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                tree[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(handle.read()).hexdigest()
    return tree


def stage3_command(run_dir, name, *extra):
    return [sys.executable, os.path.join(ROOT, "stage3_student.py"), "--run-dir", run_dir, "--variant", "B0",
            "--name", name, "--checkpoint-every", "2", *TINY, *extra]


def wait_for(condition, process, what, seconds=120):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert condition(), f"{what} never happened (the process ended with {process.poll()})"


@pytest.fixture(scope="module")
def run_with_student(tmp_path_factory):
    """A run with a bank and one finished B0 student, stage3/old/."""
    run_dir = str(tmp_path_factory.mktemp("run"))
    write_stage1(run_dir, count=400)
    stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])
    stage3_student.main(["--run-dir", run_dir, "--name", "old", "--variant", "B0", *TINY])
    return run_dir


def assert_whole(folder):
    artifacts.verify_manifest(folder, sorted(artifacts.read_manifest(folder)))


# Run names ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../stage2", "/tmp/elsewhere", "a/b", ".hidden", "old.partial", "", "x" * 101,
                                  "B 3"])
def test_a_run_name_that_is_not_one_folder_name_is_refused(run_with_student, name, capsys):
    before = snapshot(run_with_student)
    with pytest.raises(SystemExit) as stopped:
        stage3_student.main(["--run-dir", run_with_student, "--variant", "B0", "--name", name, *TINY])
    assert stopped.value.code == 2
    message = f"error: argument --name: {name!r} is not a run name: use 1 to 100 letters, digits"
    assert message in capsys.readouterr().err
    assert snapshot(run_with_student) == before


@pytest.mark.parametrize("flags", [["--variants", "old", ".."], ["--reference", "../stage2"],
                                   ["--replicates", "g=old,/tmp/x"]])
def test_stage4_refuses_student_names_that_are_paths(flags, capsys):
    with pytest.raises(SystemExit):
        stage4_eval.parse_args(flags)
    assert "is not a run name" in capsys.readouterr().err


def test_a_stage_deletes_only_its_own_folder_and_its_siblings(tmp_path):
    stage = tmp_path / "stage3" / "B3"
    for folder in (stage, tmp_path / "stage2", tmp_path / "stage3" / "B30", tmp_path / "stage3" / "B3.partial"):
        folder.mkdir(parents=True)
    (tmp_path / "stage3" / "B3.link").symlink_to(tmp_path / "stage2")  # a sibling's name, pointing elsewhere
    with pytest.raises(artifacts.ArtifactError, match="held by this run"):
        artifacts.remove_tree(str(tmp_path / "stage3" / "B3.partial"), str(stage))  # without the lock
    with artifacts.folder_lock(str(stage)):
        for path in (tmp_path / "stage2", tmp_path, tmp_path / "stage3", tmp_path / "stage3" / "B30",
                     tmp_path / "stage3" / "B3.link"):
            with pytest.raises(artifacts.ArtifactError, match=rf"refusing to delete {path}"):
                artifacts.remove_tree(str(path), str(stage))
        artifacts.remove_tree(str(tmp_path / "stage3" / "B3.partial"), str(stage))
    assert sorted(os.listdir(tmp_path / "stage3")) == ["B3", "B3.link", "B3.lock", "B30"]
    assert (tmp_path / "stage2").is_dir()


# One writer per folder ------------------------------------------------------------------------------------------

@contextmanager
def lock_held_elsewhere(folder):
    """Another live process holding folder's lock, as a run writing it would."""
    script = ("import sys, time\nfrom ngd_ext import artifacts\nwith artifacts.folder_lock(sys.argv[1]):\n"
              "    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, folder], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("stage, folder, arguments", [
    (stage1_teacher, "stage1", ["--synthetic-size", "tiny", "--device", "cpu"]),
    (stage2_prototypes, "stage2", []),
    (stage4_eval, "stage4", ["--synthetic-size", "tiny", "--device", "cpu"]),
], ids=["stage1", "stage2", "stage4"])
def test_a_second_writer_stops_at_once_naming_the_first(run_with_student, stage, folder, arguments):
    path = os.path.join(run_with_student, folder)
    with lock_held_elsewhere(path) as pid:
        before = snapshot(run_with_student)
        with pytest.raises(artifacts.StageBusy, match=rf"^{path} is being written by another run \(PID {pid}\); "
                                                      "wait for it to end, or stop it"):
            stage.main(["--run-dir", run_with_student, *arguments])
    assert snapshot(run_with_student) == before
    with artifacts.folder_lock(path):  # the lock went with its process
        pass


def test_two_stage3_runs_of_one_name_the_second_refused_the_first_whole(run_with_student):
    first = subprocess.Popen(stage3_command(run_with_student, "twice"), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = os.path.join(run_with_student, "stage3", "twice.lock")
    wait_for(lambda: os.path.exists(lock) and open(lock).read().strip() == str(first.pid), first,
             "the first run's lock")
    second = subprocess.run(stage3_command(run_with_student, "twice"), cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 1
    assert second.stderr == (f"stage3_student.py: {run_with_student}/stage3/twice is being written by another run "
                             f"(PID {first.pid}); wait for it to end, or stop it, before running this again\n")
    assert first.wait() == 0, first.stderr.read()
    assert_whole(os.path.join(run_with_student, "stage3", "twice"))
    assert sorted(os.listdir(os.path.join(run_with_student, "stage3"))) == [
        "data_summary.json", "old", "old.lock", "twice", "twice.lock"]


# A stage-3 rerun keeps the previous student until the new one is whole -----------------------------------------

def test_a_rerun_killed_in_training_leaves_the_previous_student_whole(run_with_student):
    old = os.path.join(run_with_student, "stage3", "old")
    before = snapshot(old)
    rerun = subprocess.Popen(stage3_command(run_with_student, "old", "--seed", "1"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(f"{old}.partial", "checkpoint.pt")
    wait_for(lambda: os.path.exists(checkpoint), rerun, "the rerun's first checkpoint")
    kill_process_tree(rerun.pid)
    rerun.wait()
    assert snapshot(old) == before
    assert_whole(old)


def test_a_rerun_that_diverges_or_fills_the_disk_leaves_the_previous_student_whole(run_with_student, monkeypatch):
    old = os.path.join(run_with_student, "stage3", "old")
    before = snapshot(old)
    forward = StudentLoss.forward

    def diverging(*arguments, **keywords):
        values = forward(*arguments, **keywords)
        values["total"] = values["total"] * float("inf")
        return values

    with monkeypatch.context() as patch:
        patch.setattr(StudentLoss, "forward", diverging)
        with pytest.raises(FloatingPointError, match=r"^epoch 1, step 0: the loss is not finite"):
            stage3_student.main(["--run-dir", run_with_student, "--name", "old", "--variant", "B0", *TINY])
    assert snapshot(old) == before

    def disk_full(*arguments, **keywords):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        with pytest.raises(artifacts.ArtifactError, match=rf"^cannot write {old}.partial/best.pt: No space left on "
                                                          "device$"):
            stage3_student.main(["--run-dir", run_with_student, "--name", "old", "--variant", "B0", *TINY])
    assert snapshot(old) == before
    assert_whole(old)


# The folder swap survives a kill at each of its steps --------------------------------------------------------

KILLED_SWAP = r"""
import os, shutil, signal, sys
import stage2_prototypes
stage, where = os.path.abspath(sys.argv[1]), sys.argv[2]
replace, rmtree = os.replace, shutil.rmtree

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def replacing(source, target):
    step = {stage + ".old": "old", stage: "new"}.get(os.path.abspath(target))
    if where == f"before {step}":
        kill()
    replace(source, target)
    if where == f"after {step}":
        kill()

def removing(path, *arguments, **keywords):
    if os.path.abspath(path) == stage + ".old" and where == "while deleting the old copy":
        os.remove(os.path.join(path, "prototypes.npz"))
        kill()
    rmtree(path, *arguments, **keywords)

os.replace, shutil.rmtree = replacing, removing
stage2_prototypes.main(["--run-dir", os.path.dirname(stage), "--grid", "4"])
"""
SWAP_STEPS = {  # where the kill falls: the grid of the stage2/ a rerun finds (5: the old run's, 4: the killed run's)
    "before old": 5,                   # the old folder not yet moved aside
    "after old": 5,                    # moved aside as stage2.old, the new one not yet in place: no stage2/
    "after new": 4,                    # the new one in place, the old one still there
    "while deleting the old copy": 4,  # the old one half deleted
}


@pytest.mark.parametrize("where", sorted(SWAP_STEPS))
def test_a_kill_at_any_step_of_the_swap_leaves_a_whole_folder(tmp_path, where):
    run_dir = str(tmp_path)
    write_stage1(run_dir, count=400)
    stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])
    stage2 = os.path.join(run_dir, "stage2")
    os.makedirs(f"{stage2}.tmp-999999999")  # the staging of a run killed long ago
    killed = subprocess.run([sys.executable, "-c", KILLED_SWAP, stage2, where], cwd=ROOT, capture_output=True,
                            text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with artifacts.folder_lock(stage2):  # what every stage does first
        pass
    assert_whole(stage2)
    with np.load(os.path.join(stage2, "prototypes.npz")) as bank:
        assert int(bank["G"]) == SWAP_STEPS[where]
    assert not os.path.exists(f"{stage2}.old")
    stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])  # and the next run ends whole
    assert_whole(stage2)
    assert sorted(os.listdir(run_dir)) == ["stage1", "stage2", "stage2.lock"]


# One line for every failure -----------------------------------------------------------------------------------

def run_stage(script, *arguments):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *arguments], cwd=ROOT, capture_output=True,
                            text=True)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr


def test_a_student_checkpoint_that_is_not_one_is_named(run_with_student, tmp_path):
    good = os.path.join(run_with_student, "stage3", "old", "best.pt")
    with open(good, "rb") as handle:
        content = handle.read()
    contents = {"text": b"not a checkpoint\n", "random": np.random.default_rng(0).bytes(4096),
                "truncated": content[:len(content) // 2], "cut short": content[:-100]}
    for kind, data in contents.items():
        folder = tmp_path / kind.replace(" ", "_")
        folder.mkdir()
        (folder / "best.pt").write_bytes(data)
        artifacts.write_manifest(str(folder))
        arguments = ["--run-dir", run_with_student, "--variant", "B1", "--name", "k", "--kd-teacher",
                     str(folder / "best.pt"), *TINY]
        with pytest.raises(artifacts.ArtifactError) as refused:
            stage3_student.main(arguments)
        assert str(refused.value).startswith(f"--kd-teacher: {folder}/best.pt: not a stage-3 checkpoint: "), kind
        assert "weights_only" not in str(refused.value)
    code, message = run_stage("stage3_student.py", *arguments)  # as the user meets it: one line
    assert (code, message) == (1, f"stage3_student.py: {refused.value}\n")


def test_a_damaged_resume_checkpoint_is_named(run_with_student):
    partial = os.path.join(run_with_student, "stage3", "damaged.partial")
    os.makedirs(partial)
    with open(os.path.join(partial, "checkpoint.pt"), "wb") as handle:
        handle.write(np.random.default_rng(1).bytes(10_000))
    with pytest.raises(artifacts.ArtifactError) as refused:
        stage3_student.main(["--run-dir", run_with_student, "--variant", "B0", "--name", "damaged", "--resume", *TINY])
    assert str(refused.value) == (f"{partial}/checkpoint.pt: not a resume checkpoint (rerun without --resume to start "
                                  "over): not a torch file of tensors and plain containers (damaged, of another "
                                  "format, or holding Python objects, which are never unpickled here)")


def test_a_pretrained_file_that_is_not_a_state_dict_is_named(run_with_student, tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"\x80\x02}q\x00.")  # a pickle, torch.save's legacy format, of an empty dict
    with pytest.raises(artifacts.ArtifactError, match=rf"^{path}: not a state_dict file: "):
        stage3_student.main(["--run-dir", run_with_student, "--variant", "B0", "--name", "p", "--pretrained",
                             str(path), *TINY])


def usage_error(stage, arguments, capsys):
    """The last line a stage's parser prints for arguments it refuses."""
    with pytest.raises(SystemExit) as stopped:
        stage.parse_args(arguments)
    assert stopped.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("stage", [stage1_teacher, stage2_prototypes, stage3_student, stage4_eval],
                         ids=lambda stage: stage.__name__)
def test_a_device_this_machine_lacks_is_a_usage_error(stage, capsys):
    assert usage_error(stage, ["--device", "cuda"], capsys).endswith(
        f"error: argument --device: cuda: this machine has no CUDA GPU that torch can use (torch {torch.__version__}, "
        f"built for CUDA {torch.version.cuda}); use cpu")
    assert usage_error(stage, ["--device", "gpu"], capsys).endswith(
        "error: argument --device: 'gpu' is not a torch device (e.g. cpu, cuda, cuda:1)")


def mount_small_disk(folder, size):
    """A tmpfs of `size` at folder (root only); skips the test where mounting is not allowed."""
    os.makedirs(folder)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    folder = str(tmp_path / "disk")
    mount_small_disk(folder, "2m")
    yield folder
    subprocess.run(["umount", folder], check=True)


def test_a_full_disk_and_a_read_only_folder_are_named(small_disk):
    """On a real full disk and a real read-only file system (a tmpfs mounted for the test)."""
    write_stage1(small_disk, count=400)
    filler = os.statvfs(small_disk)
    with open(os.path.join(small_disk, "filler"), "wb") as handle:  # leaves 16 KB: the bank fits, its pictures not
        handle.write(b"\0" * (filler.f_bavail * filler.f_frsize - 16384))
    with pytest.raises(artifacts.ArtifactError, match=rf"^cannot write {small_disk}/stage2\S*: No space left on "
                                                      "device$"):
        stage2_prototypes.main(["--run-dir", small_disk, "--min-count", "1"])
    assert sorted(os.listdir(small_disk)) == ["filler", "stage1", "stage2.lock"]  # no half-written stage2/
    os.remove(os.path.join(small_disk, "filler"))
    subprocess.run(["mount", "-o", "remount,ro", small_disk], check=True)
    with pytest.raises(artifacts.ArtifactError, match=rf"^cannot write {small_disk}/stage2.lock: Read-only file "
                                                      "system$"):
        stage2_prototypes.main(["--run-dir", small_disk])


def test_a_full_disk_in_the_middle_of_writing_names_the_file(tmp_path, monkeypatch):
    """Wherever no tmpfs can be mounted: the error a full disk raises, injected where stage 2 writes its bank."""
    run_dir = str(tmp_path)
    write_stage1(run_dir, count=400)

    def disk_full(*arguments, **keywords):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stage2_prototypes.np, "savez", disk_full)
    with pytest.raises(artifacts.ArtifactError, match=rf"^cannot write {run_dir}/stage2: No space left on device$"):
        stage2_prototypes.main(["--run-dir", run_dir, "--min-count", "1"])
    assert sorted(os.listdir(run_dir)) == ["stage1", "stage2.lock"]


@pytest.mark.parametrize("stage, flag, value, expected", [
    (stage3_student, "--kd-weight", "-0.3", "'-0.3': expected a finite number >= 0"),
    (stage3_student, "--proto-weight", "nan", "'nan': expected a finite number"),
    (stage3_student, "--dgeo-weight", "inf", "'inf': expected a finite number"),
    (stage3_student, "--lr", "0", "'0': expected a finite number > 0"),
    (stage3_student, "--lr", "1e999", "'1e999': expected a finite number"),
    (stage3_student, "--weight-decay", "-1", "'-1': expected a finite number >= 0"),
    (stage3_student, "--tau", "x", "'x' is not a number"),
    (stage1_teacher, "--lr", "-0.002", "'-0.002': expected a finite number > 0"),
    (stage1_teacher, "--window-s", "nan", "'nan': expected a finite number"),
])
def test_weights_and_rates_must_be_finite_and_in_range(stage, flag, value, expected, capsys):
    assert usage_error(stage, [flag, value], capsys).endswith(f"error: argument {flag}: {expected}")


def test_a_usage_error_ends_in_a_line_naming_the_flag():
    code, message = run_stage("stage3_student.py", "--kd-weight", "-1")
    assert code == 2 and message.splitlines()[-1] == ("stage3_student.py: error: argument --kd-weight: '-1': expected "
                                                      "a finite number >= 0")
