"""Artifacts passed between stages: atomic writes, SHA-256 manifests, each stage's config.json, and the
checkpoints a killed run resumes from.

Every stage folder holds its outputs, a `config.json` and a `SHA256SUMS` manifest in `sha256sum` format. A
stage reads another stage's files only after `verify_manifest` has checked them, and writes its own through
`atomic_path`, so that a run killed at any moment never leaves a file that looks complete.
"""

import contextlib
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
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


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path`; rename it to `path` only if the block completes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; only if the block completes, it replaces `path` (an older
    `path` is moved aside first and then deleted). Leftovers of killed runs are removed on the way in."""
    path = path.rstrip(os.sep)
    for leftover in glob.glob(f"{glob.escape(path)}.tmp-*") + glob.glob(f"{glob.escape(path)}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    temporary, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    os.makedirs(temporary)
    try:
        yield temporary
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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


def resume_checkpoint(path, config, resume, may_change=()):
    """The checkpoint to continue from, or None to start afresh: with resume, the one at path if there is one, which
    must have been written by a run with this config, but for the keys in may_change; without, none."""
    if not resume or not os.path.exists(path):
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    changed = sorted(key for key in config.keys() | checkpoint["config"].keys()
                     if config.get(key) != checkpoint["config"].get(key) and key not in may_change)
    if changed:
        raise ArtifactError(f"{path} was written with other settings ({', '.join(changed)}); rerun without --resume "
                            "to start over")
    return checkpoint
