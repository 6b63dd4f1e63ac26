"""Artifacts passed between stages: atomic writes, SHA-256 manifests, each stage's config.json, and the
checkpoints a killed run resumes from.

Every stage folder holds its outputs, a `config.json` and a `SHA256SUMS` manifest in `sha256sum` format. A
stage reads another stage's files only after `verify_manifest` has checked them, and writes its own through
`atomic_path`, so that a run killed at any moment never leaves a file that looks complete.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from importlib import metadata

import numpy as np
import torch

MANIFEST = "SHA256SUMS"
CONFIG = "config.json"


class ArtifactError(RuntimeError):
    """A stage's input is missing, unlisted, or does not match its manifest."""


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StageBusy(ArtifactError):
    """Another live process is writing the folder this run would write."""


_HELD_LOCKS = {}  # lock file -> [its open file, holds]: a process may take its own lock again (atomic_dir does)


def _write_error(error, path):
    """An OSError met while writing `path` as an ArtifactError naming the file (not its temporary name) and errno's
    meaning."""
    where = re.sub(r"\.tmp-\d+", "", str(error.filename or path))
    return ArtifactError(f"cannot write {where}: {error.strerror or error}")


def _lock_holder(handle):
    handle.seek(0)
    holder = handle.read().strip()
    return f"PID {holder}" if holder.isdigit() else "a process that has not yet written its PID"


@contextlib.contextmanager
def folder_lock(folder, wait=False):
    """Hold `folder`'s lock (an OS file lock on `folder`.lock, beside it) for the block: one writer per folder. The
    kernel drops the lock when its process dies, so a killed run never leaves it held. Another live holder stops this
    run at once with StageBusy naming it (wait=True: wait for it instead). Taking it first mends the swap of a run
    killed inside replace_folder."""
    lock_path = os.path.abspath(folder.rstrip(os.sep)) + ".lock"
    if lock_path in _HELD_LOCKS:
        _HELD_LOCKS[lock_path][1] += 1
    else:
        try:
            os.makedirs(os.path.dirname(lock_path), exist_ok=True)
            handle = open(lock_path, "a+")
        except OSError as error:
            raise _write_error(error, lock_path) from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _lock_holder(handle)
            handle.close()
            raise StageBusy(f"{folder} is being written by another run ({holder}); wait for it to end, or stop it, "
                            "before running this again") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD_LOCKS[lock_path] = [handle, 1]
        recover_swap(folder.rstrip(os.sep))  # before anything else, what a run killed in mid-swap left
    try:
        yield
    finally:
        _HELD_LOCKS[lock_path][1] -= 1
        if not _HELD_LOCKS[lock_path][1]:
            _HELD_LOCKS.pop(lock_path)[0].close()  # closing the file releases the lock


def holds_lock(folder):
    return os.path.abspath(folder.rstrip(os.sep)) + ".lock" in _HELD_LOCKS


def remove_tree(path, folder):
    """Delete `path`, which must be `folder` itself or one of its siblings `folder`.<suffix> (its staging, its
    previous copy), and `folder`'s lock must be held: a stage never deletes what is not its own, nor what another
    live run is writing."""
    folder, target = os.path.realpath(folder.rstrip(os.sep)), os.path.realpath(path)
    ours = target == folder or (os.path.dirname(target) == os.path.dirname(folder)
                                and os.path.basename(target).startswith(os.path.basename(folder) + "."))
    if not ours or not holds_lock(folder):
        raise ArtifactError(f"refusing to delete {path}: not {folder} or a sibling of it held by this run")
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    elif os.path.lexists(target):
        os.remove(target)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; rename it to `path` only if the block completes. An OSError while
    writing it (a full disk, a read-only folder) becomes an ArtifactError naming the file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise _write_error(error, path) from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def recover_swap(path):
    """Finish what a run killed inside replace_folder left: its previous copy `path`.old is put back where `path` is
    missing (killed between the two renames), and deleted where `path` is whole (killed after them)."""
    old = f"{path}.old"
    if os.path.lexists(old):
        if os.path.lexists(path):
            remove_tree(old, path)
        else:
            os.replace(old, path)


def replace_folder(staging, path):
    """Put the finished folder `staging` at `path` in three steps, each of which a kill may follow; recover_swap
    mends any of them. `path`'s lock must be held."""
    if os.path.lexists(path):
        os.replace(path, f"{path}.old")
    os.replace(staging, path)
    remove_tree(f"{path}.old", path)


@contextlib.contextmanager
def atomic_dir(path, wait=False):
    """Yield a staging folder beside `path`; only if the block completes, it replaces `path`. Holds `path`'s lock
    throughout (see folder_lock; `wait` too), and first removes the stagings of killed runs. An OSError while writing
    becomes an ArtifactError naming the file."""
    path = path.rstrip(os.sep)
    with folder_lock(path, wait):
        for leftover in glob.glob(f"{glob.escape(path)}.tmp-*"):
            remove_tree(leftover, path)
        staging = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(staging)
            yield staging
            replace_folder(staging, path)
        except OSError as error:
            raise _write_error(error, staging) from error
        finally:
            if os.path.lexists(staging):
                remove_tree(staging, path)


def read_cache_entry(path, read):
    """read(the entry) for the .npz cache entry at path, or None where there is none or it cannot be read (a damaged
    file): the caller then makes it anew and rewrites it."""
    try:
        with np.load(path, allow_pickle=False) as entry:
            return read(entry)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def write_json(path, data):
    with atomic_path(path) as temporary:
        with open(temporary, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")


def save_figure(figure, path, dpi=120):
    """A finished pyplot figure as a PNG: laid out, written atomically, then closed."""
    from matplotlib import pyplot  # here, so that importing this module never picks a matplotlib backend

    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    pyplot.close(figure)


def write_manifest(stage_dir):
    """List every file in stage_dir (recursively, the manifest aside) with its SHA-256, written last."""
    entries = []
    for root, _, files in os.walk(stage_dir):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, stage_dir)
            if relative == MANIFEST or ".tmp-" in name:
                continue
            entries.append(f"{sha256_file(path)}  {relative}\n")
    with atomic_path(os.path.join(stage_dir, MANIFEST)) as temporary:
        with open(temporary, "w") as handle:
            handle.writelines(sorted(entries, key=lambda line: line.split("  ", 1)[1]))


def read_manifest(stage_dir):
    path = os.path.join(stage_dir, MANIFEST)
    if not os.path.exists(path):
        raise ArtifactError(f"{path} is missing: {stage_dir} is not a finished stage output (run that stage first)")
    hashes = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            digest, separator, name = line.rstrip("\n").partition("  ")
            if not separator or len(digest) != 64:
                raise ArtifactError(f"{path}, line {number}: expected '<sha256>  <file>', got {line.strip()!r}")
            hashes[name] = digest
    return hashes


def verify_manifest(stage_dir, names):
    """Check that each of `names` (paths relative to stage_dir) is listed in its manifest and matches.

    Returns {name: sha256}, for the reading stage's config.json.
    """
    listed = read_manifest(stage_dir)
    verified = {}
    for name in names:
        path = os.path.join(stage_dir, name)
        if name not in listed:
            raise ArtifactError(f"{path} is not listed in {os.path.join(stage_dir, MANIFEST)}")
        if not os.path.exists(path):
            raise ArtifactError(f"{path} is listed in {MANIFEST} but missing")
        actual = sha256_file(path)
        if actual != listed[name]:
            raise ArtifactError(f"{path} does not match {MANIFEST}: sha256 {actual}, expected {listed[name]} "
                                "(the file changed after its stage wrote it)")
        verified[name] = actual
    return verified


def package_versions(names=("torch", "torchvision", "numpy", "mne", "scipy", "matplotlib", "pillow")):
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit():
    """The checkout's commit (with '+dirty' if it has uncommitted changes), or None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_config(stage_dir, args, inputs):
    """config.json: every argument, package versions, the git commit and the SHA-256 of every input."""
    write_json(os.path.join(stage_dir, CONFIG), {
        "arguments": dict(vars(args)),
        "command": sys.argv,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "inputs": inputs,
    })


def save_checkpoint(checkpoint, path):
    """torch.save through atomic_path and a file object: a full disk is then an OSError naming errno's meaning (torch's
    own writer reports it as an internal assertion), and an ArtifactError naming the file."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        torch.save(checkpoint, handle)


def load_checkpoint(path, what, keys=()):
    """torch.load(weights_only=True) of the checkpoint at path, a dict holding `keys`. A file that is not one (damaged,
    truncated, of another format, or holding Python objects beyond tensors and plain containers, which are never
    unpickled here) is an ArtifactError naming the file and `what` it should be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols says nothing about the file's use
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        if error.filename is None:  # a seek past the end of a truncated file
            raise ArtifactError(f"{path}: not {what}: the file is damaged or truncated") from error
        raise ArtifactError(f"{path}: cannot be read ({error.strerror})") from error
    except pickle.UnpicklingError as error:
        raise ArtifactError(f"{path}: not {what}: not a torch file of tensors and plain containers (damaged, of "
                            "another format, or holding Python objects, which are never unpickled here)") from error
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, zipfile.BadZipFile) as error:
        raise ArtifactError(f"{path}: not {what}: the file is damaged or truncated ({type(error).__name__})") \
            from error
    missing = [key for key in keys if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ArtifactError(f"{path}: not {what}: it lacks {', '.join(map(repr, missing))}")
    return checkpoint


def resume_checkpoint(path, config, resume, may_change=()):
    """The checkpoint to continue from, or None to start afresh: with resume, the one at path if there is one, which
    must have been written by a run with this config, but for the keys in may_change; without, none."""
    if not resume or not os.path.exists(path):
        return None
    checkpoint = load_checkpoint(path, "a resume checkpoint (rerun without --resume to start over)", ["config"])
    if not isinstance(checkpoint["config"], dict):
        raise ArtifactError(f"{path}: not a resume checkpoint (its config is not a dict); rerun without --resume to "
                            "start over")
    changed = sorted(key for key in config.keys() | checkpoint["config"].keys()
                     if config.get(key) != checkpoint["config"].get(key) and key not in may_change)
    if changed:
        raise ArtifactError(f"{path} was written with other settings ({', '.join(changed)}); rerun without --resume "
                            "to start over")
    return checkpoint
