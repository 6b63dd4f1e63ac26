"""stage1/embeddings.npz: the teacher's L2-normalised embeddings of held-out windows, written by stage 1 and
read by stage 2.

Arrays: embeddings (N x E float32, unit rows), valence and arousal (N, in [-1, 1]), subject and trial (N
strings, e.g. "dreamer-03" and "dreamer-03/2"), and source (a string naming the data, "synthetic" for the
embedded default).
"""

import numpy as np

from ngd_ext.artifacts import atomic_path

FIELDS = ("embeddings", "valence", "arousal", "subject", "trial", "source")


class EmbeddingsError(ValueError):
    """An embeddings file that stage 2 cannot use."""


def save_embeddings(path, embeddings, valence, arousal, subject, trial, source):
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, embeddings=np.asarray(embeddings, dtype=np.float32),
                     valence=np.asarray(valence, dtype=np.float32), arousal=np.asarray(arousal, dtype=np.float32),
                     subject=np.asarray(subject, dtype=str), trial=np.asarray(trial, dtype=str),
                     source=np.asarray(source))


def load_embeddings(path):
    """Return a dict of the fields above, after checking names, shapes, ranges and finiteness."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in FIELDS if name not in data.files]
            if missing:
                raise EmbeddingsError(f"{path}: missing arrays {missing}; expected {list(FIELDS)}")
            loaded = {name: data[name] for name in FIELDS}
    except (OSError, ValueError) as error:
        if isinstance(error, EmbeddingsError):
            raise
        raise EmbeddingsError(f"{path}: not a readable .npz file ({error})") from error
    embeddings = loaded["embeddings"]
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise EmbeddingsError(f"{path}: embeddings must be N x E with N >= 1, got shape {embeddings.shape}")
    for name in ("valence", "arousal", "subject", "trial"):
        if loaded[name].shape != (len(embeddings),):
            raise EmbeddingsError(f"{path}: {name} must have shape ({len(embeddings)},), got {loaded[name].shape}")
    for name in ("embeddings", "valence", "arousal"):
        bad = np.flatnonzero(~np.isfinite(loaded[name]).reshape(len(embeddings), -1).all(axis=1))
        if len(bad):
            raise EmbeddingsError(f"{path}: {name} is not finite in row {bad[0]}")
    for name in ("valence", "arousal"):
        outside = np.flatnonzero(np.abs(loaded[name]) > 1)
        if len(outside):
            raise EmbeddingsError(f"{path}: {name}[{outside[0]}] = {loaded[name][outside[0]]} is outside [-1, 1]")
    loaded["source"] = str(loaded["source"])
    return loaded
