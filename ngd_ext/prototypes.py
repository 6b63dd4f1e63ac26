"""The G x G valence/arousal grid, the prototype bank built on it, and the Proto-KD target table
(SPEC sections 2 and 3)."""

import os
from dataclasses import dataclass

import numpy as np

from ngd_ext import artifacts

GRID_LOW, GRID_HIGH = -0.8, 0.8


class BankError(ValueError):
    """The embeddings cannot make a prototype bank."""


def bin_centres(grid):
    """The G centres of each axis: linspace(-0.8, 0.8, G)."""
    if grid < 2:
        raise BankError(f"the grid must have at least 2 bins per axis, got G = {grid}")
    return np.linspace(GRID_LOW, GRID_HIGH, grid)


def grid_centres(grid):
    """G^2 x 2: the (valence, arousal) centre of each bin, in prototype order k = i_valence * G + i_arousal."""
    axis = bin_centres(grid)
    return np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)


def axis_bins(values, grid):
    """Index of the nearest centre for each value; an exact tie goes to the lower index.

    Distances are rounded to 1e-12 first, so that a value half-way between two centres counts as a tie
    whatever the rounding of linspace.
    """
    values = np.asarray(values, dtype=np.float64)
    distance = np.round(np.abs(values[:, None] - bin_centres(grid)[None, :]), 12)
    return distance.argmin(axis=1)  # argmin takes the first of equal values


def va_bins(valence, arousal, grid):
    """Prototype index k = i_valence * G + i_arousal of each (valence, arousal) pair."""
    return axis_bins(valence, grid) * grid + axis_bins(arousal, grid)


def unit_rows(matrix):
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-8)


def nearest_prototypes(embeddings, bank):
    """Each embedding's nearest prototype by cosine, as an index into the bank; of equal prototypes (a bin stage 2
    filled from a neighbour, and that neighbour) the lower index."""
    return (unit_rows(embeddings) @ unit_rows(bank).T).argmax(axis=1)


@dataclass
class PrototypeBank:
    bank: np.ndarray          # K x E, unit rows, K = G * G
    counts: np.ndarray        # K, embeddings per bin
    filled_from: np.ndarray   # K, the bin whose prototype each bin holds (itself when non-empty)
    grid: int

    @property
    def centres(self):
        """K x 2 (valence, arousal) centre of each bin, in prototype order."""
        return grid_centres(self.grid)


def build_bank(embeddings, valence, arousal, grid=5):
    """Prototype k = unit mean of the unit embeddings in bin k; an empty bin takes the prototype of the
    nearest non-empty bin (Euclidean distance between bin centres, ties to the lowest index)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or len(embeddings) != len(valence) or len(valence) != len(arousal):
        raise BankError(f"embeddings must be N x E with N valence and N arousal values, got "
                        f"{embeddings.shape}, {len(valence)} and {len(arousal)}")
    if not np.isfinite(embeddings).all():
        raise BankError("embeddings contain non-finite values")
    bins = va_bins(valence, arousal, grid)
    size = grid * grid
    counts = np.bincount(bins, minlength=size)
    occupied = np.flatnonzero(counts)
    if len(occupied) < 2:
        raise BankError(f"only {len(occupied)} of the {size} bins hold embeddings; a bank needs at least 2 "
                        "non-empty bins")
    sums = np.zeros((size, embeddings.shape[1]))
    np.add.at(sums, bins, unit_rows(embeddings))
    bank = np.zeros_like(sums)
    bank[occupied] = unit_rows(sums[occupied] / counts[occupied, None])

    centres = grid_centres(grid)
    distance = np.linalg.norm(centres[:, None, :] - centres[None, occupied, :], axis=-1)
    nearest = occupied[np.round(distance, 12).argmin(axis=1)]  # occupied is ascending: ties go low
    filled_from = np.where(counts > 0, np.arange(size), nearest)
    bank = bank[filled_from]
    return PrototypeBank(bank=bank, counts=counts, filled_from=filled_from, grid=grid)


def proto_kd_targets(bank, grid, anchors, tau):
    """C x K table: row c = softmax_k(cos(p_b(c), p_k) / tau), b(c) the bin of class c's (valence, arousal)
    anchor; the distribution that a student embedding equal to p_b(c) would produce."""
    anchors = np.asarray(anchors, dtype=np.float64)
    unit = unit_rows(bank)
    logits = unit[va_bins(anchors[:, 0], anchors[:, 1], grid)] @ unit.T / tau
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def load_bank(stage2_dir, name="prototypes.npz"):
    """Stage 2's prototype bank after its manifest check: (its SHA-256, bank K x E, grid side G, filled_from)."""
    bank_hash = artifacts.verify_manifest(stage2_dir, [name])[name]
    with np.load(os.path.join(stage2_dir, name)) as saved:
        return bank_hash, saved["bank"].astype(np.float64), int(saved["G"]), saved["filled_from"]

