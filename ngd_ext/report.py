"""The tables and pictures of stages 3 and 4: a student's training curves; the summary's Markdown and LaTeX tables, one
function a table; the figures of each student on each dataset and of the whole evaluation."""

import csv

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ngd_ext import artifacts  # noqa: E402
from ngd_ext.emotions import DEFAULT_ANCHORS, FER_CLASSES, VA_DIMENSIONS  # noqa: E402
from ngd_ext.inference import READOUTS, class_probabilities, readout_columns  # noqa: E402
from ngd_ext.metrics import BOOTSTRAP_LEVEL, MECHANISM_SETS  # noqa: E402
from ngd_ext.prototypes import bin_centres, nearest_prototypes, unit_rows  # noqa: E402
from ngd_ext.student_loss import INERT_SHARE  # noqa: E402
from ngd_ext.student_model import label_of  # noqa: E402

LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}", "✓": r"\checkmark",
                 "±": r"$\pm$"}


def latex_escape(text):
    """Text as LaTeX typesets it literally (run and dataset names may hold &, %, _ ...)."""
    return "".join(LATEX_ESCAPES.get(character, character) for character in text)


def table(header, rows, caption):
    """The same table as Markdown and as LaTeX (booktabs)."""
    def markdown_row(cells):
        return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"

    def latex_row(cells):
        return " & ".join(map(latex_escape, cells)) + r" \\"

    markdown = [f"**{caption}**", "", markdown_row(header), f"|{'|'.join('---' for _ in header)}|",
                *map(markdown_row, rows)]
    latex = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\begin{{tabular}}{{l{'c' * (len(header) - 1)}}}", r"\toprule", latex_row(header), r"\midrule",
             *map(latex_row, rows), r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(markdown), "\n".join(latex)


def percent(value):
    return f"{100 * value:.1f}"


def with_interval(value, bounds, signed=False):
    """A score in % (or a difference in points, with its sign) and its interval: '53.5 [48.2, 58.9]'."""
    form = "+.1f" if signed else ".1f"
    return f"{100 * value:{form}} [{100 * bounds[0]:{form}}, {100 * bounds[1]:{form}}]"


def protocol_cells(scores):
    """One protocol's Acc, macro-F1 with its interval, and bACC, in %."""
    return [percent(scores["accuracy"]), with_interval(scores["macro_f1"], scores["interval"]["macro_f1"]),
            percent(scores["balanced_accuracy"])]


def rated_sets(results, reference, datasets):
    """[(key, display name)] of the datasets whose images carry valence/arousal ratings."""
    return [(key, dataset_name) for key, dataset_name, _ in datasets if "valence_arousal" in results[reference][key]]


def readout_rows(results, variants, rated):
    """[(name, config, readout)]: every student's V/A readouts, in READOUTS' order (a student has the same readouts
    on every set)."""
    return [(name, config, readout) for name, config in variants for readout in READOUTS
            if readout in results[name][rated[0][0]]["valence_arousal"]["readouts"]]


LEVEL = f"{100 * BOOTSTRAP_LEVEL:.0f}%"


def ablation_table(results, variants, datasets, note):
    """Variants x datasets: 8-way / present-only macro-F1, with the loss terms each variant uses."""
    rows = []
    for name, config in variants:
        marks = ["✓" if config[weight] > 0 else "" for weight in ("kd_weight", "proto_weight", "dgeo_weight")]
        rows.append([label_of(name, config), *marks, *(
            f"{percent(results[name][key]['eight_way']['macro_f1'])} / "
            f"{percent(results[name][key]['present_only']['macro_f1'])}" for key, _, _ in datasets)])
    return table(["variant", "KD", "Proto-KD", "D-Geo", *(name for _, name, _ in datasets)], rows,
                 f"Ablation: macro-F1 (%), 8-way / present-only, by variant and dataset ({note})")


def differences_table(differences, reference, variants, datasets, note, resamples):
    """Every student's 8-way macro-F1 minus the reference's, with the paired-bootstrap interval."""
    rows = [[label_of(name, config), *(with_interval(differences[name][key]["eight_way"]["macro_f1"],
                                                     differences[name][key]["eight_way"]["interval"]["macro_f1"],
                                                     signed=True) for key, _, _ in datasets)]
            for name, config in variants if name in differences]
    return table(["variant", *(name for _, name, _ in datasets)], rows,
                 f"Difference from {label_of(reference, dict(variants)[reference])}: 8-way macro-F1, in points, with "
                 f"its {LEVEL} paired-bootstrap interval over the images or their groups ({resamples} resamples; "
                 f"{note})")


def replicates_table(replicates, datasets, note):
    """Each --replicates group's 8-way macro-F1, mean and standard deviation over its seeds."""
    rows = [[group, ", ".join(map(str, entry["seeds"])), *(
        "{0:.1f} ± {1:.1f}".format(*(100 * entry["datasets"][key]["eight_way"]["macro_f1"][stat]
                                      for stat in ("mean", "sd"))) for key, _, _ in datasets)]
            for group, entry in replicates.items()]
    return table(["replicates", "seeds", *(name for _, name, _ in datasets)], rows,
                 f"Across training seeds: 8-way macro-F1 (%), mean ± standard deviation (n - 1) over each "
                 f"--replicates group's students ({note})")


def paired_table(paired, datasets, note):
    """Each group's 8-way macro-F1 minus the reference group's, paired by seed, with its t-interval."""
    def cell(difference):
        return (f"{with_interval(difference['mean'], difference['interval'], signed=True)}, "
                f"{difference['above_zero']} of {len(difference['values'])} above 0")

    rows = [[group, ", ".join(map(str, entry["seeds"])), *(cell(entry["datasets"][key]["eight_way"]["macro_f1"])
                                                           for key, _, _ in datasets)]
            for group, entry in paired.items()]
    return table(["replicates", "seeds", *(name for _, name, _ in datasets)], rows,
                 f"Paired by training seed: each group's 8-way macro-F1 minus that of "
                 f"{next(iter(paired.values()))['from']}'s student of the same seed, in points: the mean over the "
                 f"seeds, its {LEVEL} t-interval (n - 1 degrees of freedom), and how many seeds' differences are above "
                 f"0 ({note})")


def cross_dataset_table(results, name, config, datasets, note):
    """One student on every dataset: both protocols' Acc, macro-F1 with its interval, and bACC."""
    rows = []
    for key, dataset_name, data in datasets:
        eight, present = results[name][key]["eight_way"], results[name][key]["present_only"]
        groups = data.summary()["groups"]
        images = f"{len(data.labels)}" + (f" ({groups} groups)" if groups is not None else "")
        rows.append([dataset_name, images, *protocol_cells(eight), str(len(present["classes"])),
                     *protocol_cells(present)])
    return table(["dataset", "images", "Acc", f"macro-F1 [{LEVEL}]", "bACC", "present classes", "Acc (present)",
                  f"macro-F1 (present) [{LEVEL}]", "bACC (present)"], rows,
                 f"Cross-dataset evaluation of {label_of(name, config)}, in %, with bootstrap intervals over the "
                 f"images, or their groups where given ({note})")


def per_class_table(results, variants, key, dataset_name, reference, note):
    """Classes x students on one dataset: each class's 8-way F1 with its interval."""
    per_class = {name: results[name][key]["eight_way"]["per_class"] for name, _ in variants}
    rows = [[FER_CLASSES[c], str(row["support"]), *(
        with_interval(per_class[name][c]["f1"], per_class[name][c]["interval"]["f1"]) for name, _ in variants)]
        for c, row in enumerate(per_class[reference])]
    return table(["class", "images", *(label_of(name, config) for name, config in variants)], rows,
                 f"Per-class F1 (%, 8-way) on {dataset_name}, with {LEVEL} bootstrap intervals, which say little for a "
                 f"class of very few images ({note})")


def readout_table(results, variants, rated, reference, note):
    """On the sets with V/A ratings: each student's readouts' CCC with its interval, and Pearson's r."""
    def cell(scores):
        low, high = scores["interval"]["ccc"]
        return f"{scores['ccc']:.2f} [{low:.2f}, {high:.2f}] (r {scores['pearson_r']:.2f})"

    rows = [[label_of(name, config), readout, *(
        cell(results[name][key]["valence_arousal"]["readouts"][readout][dimension]) for key, _ in rated
        for dimension in VA_DIMENSIONS)] for name, config, readout in readout_rows(results, variants, rated)]
    counts = ", ".join(f"{dataset_name} {results[reference][key]['valence_arousal']['images']}"
                       for key, dataset_name in rated)
    return table(["student", "readout", *(f"{dataset_name} {dimension}" for _, dataset_name in rated
                                          for dimension in VA_DIMENSIONS)], rows,
                 f"Valence and arousal read out from the students, beyond the paper's protocol: CCC with its {LEVEL} "
                 f"bootstrap interval, and Pearson's r, against the ratings of the rated images ({counts}); "
                 f"prototype: {READOUTS['prototype']}, class: {READOUTS['class']} ({note})")


def summary_tables(results, differences, replicates, paired, reference, variants, datasets, note, resamples,
                   mechanisms_done=()):
    """The summary's tables, in order, as (markdown, latex): the ablation, the differences from the reference, the
    replicates and their paired differences, what each term did, each student's cross-dataset table, each dataset's
    per-class F1, and the V/A readouts on rated sets."""
    tables = [ablation_table(results, variants, datasets, note)]
    if differences:
        tables.append(differences_table(differences, reference, variants, datasets, note, resamples))
    if replicates:
        tables.append(replicates_table(replicates, datasets, note))
    if paired:
        tables.append(paired_table(paired, datasets, note))
    tables += mechanisms_done
    tables += [cross_dataset_table(results, name, config, datasets, note) for name, config in variants]
    tables += [per_class_table(results, variants, key, name, reference, note) for key, name, _ in datasets]
    rated = rated_sets(results, reference, datasets)
    if rated:
        tables.append(readout_table(results, variants, rated, reference, note))
    return ("\n\n".join(md for md, _ in tables) + "\n", "\n\n".join(tex for _, tex in tables) + "\n")


MECHANISM_COLUMNS = {"proto_kd_kl": ("Proto-KD: KL to class targets", ".3f"),
                     "positive_variance": ("D-Geo: positive-class variance", ".3f"),
                     "class_mean_distance": ("D-Geo: class-mean distance", ".3f")}


def mechanism_cell(entry, measure, form):
    """A measure's value with its interval, and its difference from the reference with the paired interval."""
    if measure not in entry["values"]:
        return "–"
    low, high = entry["intervals"][measure]
    cell = f"{entry['values'][measure]:{form}} [{low:{form}}, {high:{form}}]"
    if measure in entry.get("differences", {}):
        change = entry["differences"][measure]
        cell += f"; {change['difference']:+{form}} [{change['interval'][0]:+{form}}, {change['interval'][1]:+{form}}]"
    return cell


def agreement_cell(entry):
    """A student's agreement with its KD teacher (%), against a CE-only student's with the same teacher where there is
    one, with the paired interval of the gain."""
    if "teacher" not in entry:
        return "– (no KD teacher)"
    mine = percent(entry["values"]["teacher_agreement"])
    if "agreement_gain" not in entry:
        return f"{mine} (no other CE-only student to compare)"
    gain = entry["agreement_gain"]
    low, high = (100 * bound for bound in gain["interval"])
    return (f"{mine} against {percent(entry['baseline_agreement'])} of {entry['baseline']}: "
            f"{100 * gain['difference']:+.1f} [{low:+.1f}, {high:+.1f}]")


def seed_cell(spread, scale=1.0, form="+.3f"):
    """A difference paired by seed: its mean, t-interval and how many seeds' differences are above 0."""
    low, high = (scale * bound for bound in spread["interval"])
    seeds = len(spread["values"])
    return f"{scale * spread['mean']:{form}} [{low:{form}}, {high:{form}}], {spread['above_zero']} of {seeds} > 0"


def mechanism_tables(measured, across, variants, datasets, reference, note):
    """'What each term did' on FERPlus valid and test, student by student, and with --replicates across seeds."""
    tables = []
    for key, dataset_name, _ in (dataset for dataset in datasets if dataset[0] in MECHANISM_SETS):
        rows = []
        for name, config in variants:
            entry = measured[name][key]
            rows.append([label_of(name, config), agreement_cell(entry), *(
                mechanism_cell(entry, measure, form) for measure, (_, form) in MECHANISM_COLUMNS.items())])
        tables.append(table(["student", "KD: top-1 agreement with its teacher (%)",
                             *(title for title, _ in MECHANISM_COLUMNS.values())], rows,
                            f"What each term did on {dataset_name}: agreement with the student's KD teacher against a "
                            f"CE-only student's with the same teacher (KD should raise it); the Proto-KD KL of the "
                            f"embeddings to their class's target (Proto-KD should lower it); the positive classes' "
                            f"variance (the cap should lower it) and the class means' distance (the margin should "
                            f"raise it); each with its {LEVEL} bootstrap interval, and after ';' its difference from "
                            f"{reference} with the paired interval ({note})"))
    rows = []
    for group, entry in across.items():
        found = entry["datasets"].get("ferplus_test", {})
        gain, changes = found.get("agreement_gain"), found.get("differences", {})
        rows.append([group, ", ".join(map(str, entry["seeds"])), entry["from"] or "–",
                     seed_cell(gain, 100, "+.1f") if gain else "–",
                     *(seed_cell(changes[measure]) if measure in changes else "–" for measure in MECHANISM_COLUMNS)])
    if rows:
        tables.append(table(["replicates", "seeds", "compared with", "KD: agreement gain (points)",
                             *(f"{title}: change" for title, _ in MECHANISM_COLUMNS.values())], rows,
                            f"What each term did on FERPlus test, across training seeds: the agreement gain over a "
                            f"CE-only student, and each measure's change from the group of the preset one term short, "
                            f"paired by seed: the mean, its {LEVEL} t-interval (n - 1 degrees of freedom) and how many "
                            f"seeds' changes are above 0 ({note})"))
    return tables


def write_predictions(path, data, logits, readouts):
    """Per image: its path, label, predicted class, class probabilities and V/A readouts, and its rating where the set
    has them (empty for an unrated image)."""
    probabilities = class_probabilities(logits)
    readout_values = np.concatenate(list(readouts.values()), axis=1)
    ratings = [] if data.va is None else [f"rated_{dimension}" for dimension in VA_DIMENSIONS]
    with artifacts.atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "predicted", *(f"p_{name}" for name in FER_CLASSES),
                             *readout_columns(readouts), *ratings])
            for i, (name, label, row) in enumerate(zip(data.paths, data.labels, probabilities)):
                rating = [] if data.va is None else ["" if np.isnan(value) else f"{value:.6f}" for value in data.va[i]]
                writer.writerow([name, FER_CLASSES[label], FER_CLASSES[int(row.argmax())],
                                 *(f"{value:.5f}" for value in (*row, *readout_values[i])), *rating])


def plot_confusions(view, title, path):
    """Counts and row-normalised confusion matrices, over the view's classes."""
    classes = view.get("classes", list(range(len(FER_CLASSES))))
    counts = np.array(view["confusion"])[np.ix_(classes, classes)]
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    names = [FER_CLASSES[c] for c in classes]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(classes), 0.6 * len(classes) + 2))
    for ax, matrix, label in ((axes[0], counts, "counts"), (axes[1], normalised, "row-normalised")):
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), value in np.ndenumerate(matrix):
            text = f"{value:d}" if label == "counts" else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(label, fontsize=9)
    figure.suptitle(title, fontsize=10)
    artifacts.save_figure(figure, path)


def plot_tsne(embeddings, labels, bank, title, path, points, seed):
    """t-SNE of (a seeded sample of) the unit embeddings, with the 25 unit prototypes as black crosses."""
    from sklearn.manifold import TSNE  # here: stage 3, which draws only its curves, need not load scikit-learn

    chosen = np.random.default_rng(seed).permutation(len(labels))[:points]
    joint = np.concatenate([unit_rows(embeddings[chosen]), unit_rows(bank)])
    perplexity = min(30.0, (len(joint) - 1) / 3)
    xy = TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(joint)
    figure, ax = plt.subplots(figsize=(6.5, 5.5))
    for c, name in enumerate(FER_CLASSES):
        mine = labels[chosen] == c
        if mine.any():
            ax.scatter(*xy[:len(chosen)][mine].T, s=8, color=plt.cm.tab10(c), label=f"{name} ({mine.sum()})")
    ax.scatter(*xy[len(chosen):].T, marker="x", s=40, color="black", label="prototypes")
    ax.legend(fontsize=7, markerscale=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    artifacts.save_figure(figure, path)


def plot_prototype_occupancy(embeddings, labels, bank, grid, title, path):
    """Per class, the share of its images whose nearest prototype (cosine) is each bin of the V/A grid, with
    the class's anchor marked. A bin stage 2 filled from a neighbour holds the same prototype; ties between
    equal prototypes go to the lower index."""
    nearest = nearest_prototypes(embeddings, bank)
    centres = bin_centres(grid)
    figure, axes = plt.subplots(2, 4, figsize=(12, 6.2))
    for c, (name, ax) in enumerate(zip(FER_CLASSES, axes.flat)):
        mine = nearest[labels == c]
        share = np.bincount(mine, minlength=grid * grid) / max(len(mine), 1)
        # k = i_valence * G + i_arousal: valence along x, arousal along y
        ax.imshow(share.reshape(grid, grid).T, origin="lower", cmap="Purples", vmin=0, vmax=1,
                  extent=(centres[0] * 1.25, centres[-1] * 1.25, centres[0] * 1.25, centres[-1] * 1.25))
        ax.plot(*DEFAULT_ANCHORS[name], marker="*", color="orange", markersize=12)
        ax.set_title(f"{name} ({len(mine)})", fontsize=9)
        ax.set_xlabel("valence", fontsize=8)
        ax.set_ylabel("arousal", fontsize=8)
    figure.suptitle(f"{title}: nearest prototype per image (star: the class's V/A anchor)", fontsize=10)
    artifacts.save_figure(figure, path)


def plot_valence_arousal(ratings, readouts, scores, title, path, seed, points=2000):
    """Each readout of valence and of arousal against the ratings (N x 2, NaN for an unrated image), for (a seeded
    sample of) the rated images."""
    rated = np.flatnonzero(~np.isnan(ratings[:, 0]))
    chosen = rated[np.random.default_rng(seed).permutation(len(rated))[:points]]
    figure, axes = plt.subplots(len(readouts), 2, figsize=(8, 3.8 * len(readouts)), squeeze=False)
    for row, (readout, values) in zip(axes, readouts.items()):
        for d, (ax, dimension) in enumerate(zip(row, VA_DIMENSIONS)):
            ax.scatter(ratings[chosen, d], values[chosen, d], s=6, alpha=0.4)
            ax.plot([-1, 1], [-1, 1], color="grey", lw=0.8)
            ax.set_xlim(-1.05, 1.05)
            ax.set_ylim(-1.05, 1.05)
            ax.set_aspect("equal")
            ax.set_xlabel(f"rated {dimension}", fontsize=8)
            ax.set_ylabel(f"{readout} readout", fontsize=8)
            got = scores[readout][dimension]
            ax.set_title(f"{dimension}: CCC {got['ccc']:.2f}, r {got['pearson_r']:.2f}, RMSE {got['rmse']:.2f}",
                         fontsize=9)
    shown = f"{len(chosen)} of {len(rated)}" if len(chosen) < len(rated) else f"{len(rated)}"
    figure.suptitle(f"{title}: V/A read out from the student ({shown} rated images)", fontsize=10)
    artifacts.save_figure(figure, path)


def bar_centres(bars, ticks):
    """Where `bars` bars stand side by side at each of `ticks` ticks: one array of x per bar, and their width."""
    width = 0.8 / bars
    return [np.arange(ticks) + (b - (bars - 1) / 2) * width for b in range(bars)], width


def bars_with_intervals(ax, centres, width, scores, bounds, label):
    """Bars at `scores`, whiskers to their interval `bounds` (n x 2), each score written above its whisker."""
    ax.bar(centres, scores, width, yerr=[scores - bounds[:, 0], bounds[:, 1] - scores], capsize=2,
           error_kw=dict(lw=0.8), label=label)
    for x, score, top in zip(centres, scores, bounds[:, 1]):
        ax.text(x, top + 0.01, f"{score:.2f}", ha="center", va="bottom", fontsize=7)


def plot_summary(results, variants, datasets, note, path):
    figure, ax = plt.subplots(figsize=(2 + 1.6 * len(datasets), 4))
    all_centres, width = bar_centres(len(variants), len(datasets))
    for centres, (name, config) in zip(all_centres, variants):
        scores = np.array([results[name][key]["eight_way"]["macro_f1"] for key, _, _ in datasets])
        bounds = np.array([results[name][key]["eight_way"]["interval"]["macro_f1"] for key, _, _ in datasets])
        bars_with_intervals(ax, centres, width, scores, bounds, label_of(name, config))
    ax.set_xticks(range(len(datasets)), [name for _, name, _ in datasets])
    ax.set_ylabel(f"8-way macro-F1 ({100 * BOOTSTRAP_LEVEL:.0f}% bootstrap interval)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Students across datasets ({note})", fontsize=10)
    artifacts.save_figure(figure, path)


def plot_replicates(replicates, paired, datasets, note, path):
    """Each --replicates group's 8-way macro-F1 per dataset: a bar at the mean, a whisker of one standard deviation
    either side, and a dot per student; beside it, where groups are paired by seed, each group's differences from the
    reference group: a dot per seed, and the mean with its t-interval."""
    panels = 2 if paired else 1
    figure, axes = plt.subplots(1, panels, figsize=(panels * (2 + 1.6 * len(datasets)), 4), squeeze=False)
    ax = axes[0, 0]
    all_centres, width = bar_centres(len(replicates), len(datasets))
    colours = {group: f"C{g}" for g, group in enumerate(replicates)}
    for centres, (group, entry) in zip(all_centres, replicates.items()):
        spreads = [entry["datasets"][key]["eight_way"]["macro_f1"] for key, _, _ in datasets]
        seeds = ", ".join(map(str, entry["seeds"]))
        ax.bar(centres, [spread["mean"] for spread in spreads], width, yerr=[spread["sd"] for spread in spreads],
               capsize=2, error_kw=dict(lw=0.8), color=colours[group], alpha=0.6, label=f"{group} (seeds {seeds})")
        for x, spread in zip(centres, spreads):
            ax.plot([x] * len(spread["values"]), spread["values"], "o", ms=3, color=colours[group],
                    markeredgecolor="black", markeredgewidth=0.5)
    ax.set_xticks(range(len(datasets)), [name for _, name, _ in datasets])
    ax.set_ylabel("8-way macro-F1 (mean ± sd; a dot per seed)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Across training seeds ({note})", fontsize=10)
    if paired:
        ax = axes[0, 1]
        reference_group = next(iter(paired.values()))["from"]
        all_centres, width = bar_centres(len(paired), len(datasets))
        for centres, (group, entry) in zip(all_centres, paired.items()):
            differences = [entry["datasets"][key]["eight_way"]["macro_f1"] for key, _, _ in datasets]
            means = np.array([difference["mean"] for difference in differences])
            bounds = np.array([difference["interval"] for difference in differences])
            ax.errorbar(centres, 100 * means, yerr=100 * np.abs(bounds.T - means), fmt="s", ms=5, capsize=3,
                        color=colours[group], label=f"{group} minus {reference_group}: mean, "
                                                    f"{100 * BOOTSTRAP_LEVEL:.0f}% t-interval; a dot per seed")
            for x, difference in zip(centres, differences):
                ax.plot([x + width / 4] * len(difference["values"]), 100 * np.array(difference["values"]), "o",
                        ms=3, color=colours[group], markeredgecolor="black", markeredgewidth=0.5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(datasets)), [name for _, name, _ in datasets])
        ax.set_ylabel("8-way macro-F1 difference (points)")
        ax.legend(fontsize=8)
        ax.set_title(f"Paired by training seed ({note})", fontsize=10)
    artifacts.save_figure(figure, path)


def plot_readout_summary(results, rows, rated, note, path):
    """Each student's readouts' CCC per rated set and dimension, with its interval; rows as readout_rows gives them."""
    ticks = [(key, f"{dataset_name}\n{dimension}", dimension) for key, dataset_name in rated
             for dimension in VA_DIMENSIONS]
    figure, ax = plt.subplots(figsize=(max(6.5, 2 + 1.6 * len(ticks)), 4.3))
    all_centres, width = bar_centres(len(rows), len(ticks))
    for centres, (name, config, readout) in zip(all_centres, rows):
        scores = [results[name][key]["valence_arousal"]["readouts"][readout][dimension] for key, _, dimension in ticks]
        ccc = np.array([mine["ccc"] for mine in scores])
        bounds = np.array([mine["interval"]["ccc"] for mine in scores])
        bars_with_intervals(ax, centres, width, ccc, bounds, f"{label_of(name, config)}, {readout}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(ticks)), [label for _, label, _ in ticks])
    ax.set_ylabel(f"CCC ({100 * BOOTSTRAP_LEVEL:.0f}% bootstrap interval)")
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Valence and arousal read out from the students, against the ratings\n({note})", fontsize=10)
    artifacts.save_figure(figure, path)


def plot_curves(history, path, note):
    """Each term's weighted value and its gradient's share against CE's, and the FERPlus-valid scores, per epoch."""
    figure, (values, shares, right) = plt.subplots(1, 3, figsize=(15, 4))
    epochs = [h["epoch"] for h in history]
    for term in ("ce", "kd", "proto_kd", "var_cap", "margin"):
        values.plot(epochs, [h["weighted"][term] for h in history], label=term)
    values.plot(epochs, [h["train"]["total"] for h in history], label="total", color="black", linestyle=":")
    values.set_yscale("symlog", linthresh=1e-4)
    values.set(xlabel="epoch", ylabel="weighted term (training mean)")
    values.legend(fontsize=8)
    for term in ("kd", "proto_kd", "var_cap", "margin"):
        if any(term in h["gradient_share"] for h in history):
            shares.plot(epochs, [h["gradient_share"].get(term, 0.0) for h in history], marker=".", label=term)
    shares.axhline(INERT_SHARE, color="grey", linestyle=":", linewidth=1)
    shares.set_yscale("symlog", linthresh=1e-3)
    shares.set(xlabel="epoch", ylabel="gradient norm against CE's (one batch)")
    if shares.get_legend_handles_labels()[0]:
        shares.legend(fontsize=8)
    for score in ("accuracy", "macro_f1", "balanced_accuracy"):
        right.plot(epochs, [h["valid"][score] for h in history], label=score)
    right.set_xlabel("epoch")
    right.set_ylabel("FERPlus valid")
    right.legend(fontsize=8)
    figure.suptitle(f"student{note}", fontsize=10)
    artifacts.save_figure(figure, path)
