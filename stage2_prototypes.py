"""Stage 2: the frozen valence/arousal prototype bank.

Reads stage 1's teacher embeddings of held-out windows (after checking them against stage 1's SHA256SUMS),
bins them on the G x G valence/arousal grid (bin centres linspace(-0.8, 0.8, G) on each axis; prototype
k = i_valence * G + i_arousal), and writes RUN_DIR/stage2/:

  prototypes.npz   bank (K x E, unit rows), centres (K x 2), counts (K), filled_from (K), E, G, and the
                   SHA-256 of the teacher that made the embeddings
  summary.json     counts and fills per bin; the empty bins and the sparse ones (below --min-count)
  occupancy.png    embeddings per bin on the grid, with the bins an empty bin borrowed from
  similarity.png   the prototypes' cosine similarities
  config.json, SHA256SUMS

    python stage2_prototypes.py                 # runs/demo, G = 5
    python stage2_prototypes.py --grid 7        # a denser grid, and its empty bins
"""

import argparse
import os
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ngd_ext import artifacts, cli  # noqa: E402
from ngd_ext.prototypes import BankError, bin_centres, build_bank  # noqa: E402
from ngd_ext.teacher_embeddings import EmbeddingsError, load_embeddings  # noqa: E402

# Defaults ---------------------------------------------------------------------------------------------------
RUN_DIR = "runs/demo"
GRID = 5          # bins per axis: K = GRID * GRID prototypes
MIN_COUNT = 5     # a bin with fewer embeddings than this (but some) is reported as sparse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=RUN_DIR, help=f"run folder holding stage1/ (default {RUN_DIR})")
    parser.add_argument("--grid", type=int, default=GRID, help=f"bins per valence/arousal axis (default {GRID})")
    parser.add_argument("--min-count", type=int, default=MIN_COUNT,
                        help=f"warn about non-empty bins with fewer embeddings than this (default {MIN_COUNT})")
    parser.add_argument("--device", type=cli.device, default="cpu",
                        help="accepted for a uniform interface; stage 2 is a few NumPy operations on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="accepted for a uniform interface; stage 2 is not random")
    args = parser.parse_args(argv)
    if args.grid < 2:
        parser.error(f"--grid must be at least 2, got {args.grid}")
    if args.min_count < 1:
        parser.error(f"--min-count must be at least 1, got {args.min_count}")
    return args


def plot_occupancy(bank, path, title):
    grid = bank.grid
    counts = bank.counts.reshape(grid, grid)  # rows: valence bin, columns: arousal bin
    centres = bin_centres(grid)
    figure, axes = plt.subplots(figsize=(1.1 * grid + 2, 1.1 * grid + 1))
    image = axes.imshow(counts.T, origin="lower", cmap="viridis")
    for i in range(grid):
        for j in range(grid):
            k = i * grid + j
            label = str(counts[i, j]) if counts[i, j] else f"empty\n<- {bank.filled_from[k]}"
            axes.text(i, j, label, ha="center", va="center", fontsize=8,
                      color="white" if counts[i, j] < counts.max() / 2 else "black")
    axes.set_xticks(range(grid), [f"{c:+.2f}" for c in centres])
    axes.set_yticks(range(grid), [f"{c:+.2f}" for c in centres])
    axes.set_xlabel("valence bin centre")
    axes.set_ylabel("arousal bin centre")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="embeddings")
    artifacts.save_figure(figure, path)


def plot_similarity(bank, path, title):
    similarity = bank.bank @ bank.bank.T
    figure, axes = plt.subplots(figsize=(7, 6))
    image = axes.imshow(similarity, vmin=-1, vmax=1, cmap="RdBu_r")
    axes.set_xlabel("prototype k = i_valence * G + i_arousal")
    axes.set_ylabel("prototype")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="cosine similarity")
    artifacts.save_figure(figure, path)


def main(argv=None):
    args = parse_args(argv)
    with artifacts.folder_lock(os.path.join(args.run_dir, "stage2")):  # one writer: a second run stops at once
        build_prototypes(args)


def build_prototypes(args):
    stage1_dir = os.path.join(args.run_dir, "stage1")
    out_dir = os.path.join(args.run_dir, "stage2")

    # Inputs: stage 1's embeddings and teacher, as its manifest lists them.
    inputs = artifacts.verify_manifest(stage1_dir, ["embeddings.npz", "teacher.pt"])
    data = load_embeddings(os.path.join(stage1_dir, "embeddings.npz"))
    synthetic = data["source"] == "synthetic"
    note = " (synthetic data: not the paper's numbers)" if synthetic else ""

    bank = build_bank(data["embeddings"], data["valence"], data["arousal"], args.grid)
    empty = [int(k) for k in np.flatnonzero(bank.counts == 0)]
    sparse = [int(k) for k in np.flatnonzero((bank.counts > 0) & (bank.counts < args.min_count))]
    for k in sparse:
        print(f"warning: bin {k} holds only {bank.counts[k]} embeddings (--min-count {args.min_count})",
              file=sys.stderr)

    # Outputs: written beside the old folder and swapped in whole at the end, so a killed run leaves the previous
    # bank as it was, and never a folder that looks finished.
    with artifacts.atomic_dir(out_dir) as staging:
        np.savez(os.path.join(staging, "prototypes.npz"), bank=bank.bank.astype(np.float32),
                 centres=bank.centres.astype(np.float32), counts=bank.counts, filled_from=bank.filled_from,
                 E=bank.bank.shape[1], G=args.grid, teacher_sha256=inputs["teacher.pt"], source=data["source"])
        summary = {
            "grid": args.grid,
            "embeddings": int(len(data["embeddings"])),
            "embedding_size": int(bank.bank.shape[1]),
            "source": data["source"],
            "bins": [{"k": k, "valence": float(v), "arousal": float(a), "count": int(bank.counts[k]),
                      "filled_from": int(bank.filled_from[k])} for k, (v, a) in enumerate(bank.centres)],
            "empty_bins": empty,
            "sparse_bins": sparse,
            "min_count": args.min_count,
        }
        artifacts.write_json(os.path.join(staging, "summary.json"), summary)
        plot_occupancy(bank, os.path.join(staging, "occupancy.png"),
                       f"{len(data['embeddings'])} held-out embeddings on the {args.grid}x{args.grid} V/A grid{note}")
        plot_similarity(bank, os.path.join(staging, "similarity.png"), f"prototype cosine similarity{note}")
        artifacts.write_config(staging, args, {f"stage1/{name}": digest for name, digest in inputs.items()})
        artifacts.write_manifest(staging)

    print(f"stage 2: {args.grid}x{args.grid} bank from {len(data['embeddings'])} embeddings of size "
          f"{bank.bank.shape[1]}{note}")
    print(f"  {args.grid ** 2 - len(empty)} bins hold embeddings, {len(empty)} are empty (filled from their "
          f"nearest non-empty bin), {len(sparse)} hold fewer than {args.min_count}")
    print(f"  wrote {out_dir}/")


if __name__ == "__main__":
    try:
        main()
    except (artifacts.ArtifactError, EmbeddingsError, BankError) as error:
        sys.exit(f"stage2_prototypes.py: {error}")
