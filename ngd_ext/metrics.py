"""The metrics of SPEC section 5, computed once over a whole prediction vector: classification, and the regression
of valence and arousal.

- 8-way: prediction = argmax over all logits; accuracy; macro-F1 = mean F1 over all classes (a class never
  predicted and absent counts 0); bACC = mean recall over the classes present in the ground truth.
- present-only: the classes present in the ground truth form the label set; prediction = argmax over their
  logits only; accuracy, macro-F1 and bACC over those classes.

Valence and arousal (stage 1's teacher, stage 4's readouts from a student) are each scored by RMSE, Pearson's r and
Lin's concordance correlation coefficient (CCC).

Their uncertainty comes from a percentile bootstrap: each resample draws as many images as there are, with
replacement, and is scored by the same rules. Where images come in groups that are not independent (the frames of a
CK+ subject), whole groups are drawn instead, as many as there are. The draws depend only on the seed and the number
of images or groups, so students scored on one dataset share them, and the difference of two students is a paired
bootstrap.
"""

import numpy as np

from ngd_ext.emotions import VA_DIMENSIONS
from ngd_ext.prototypes import unit_rows

SCORES = ("accuracy", "macro_f1", "balanced_accuracy")
REGRESSION_SCORES = ("rmse", "pearson_r", "ccc")
PER_CLASS = ("precision", "recall", "f1")
PROTOCOLS = ("eight_way", "present_only")
BOOTSTRAP_LEVEL = 0.95
# Resamples are drawn in blocks of at most this many draws, so that memory stays bounded however many images a
# dataset has; the draws themselves do not depend on it.
BOOTSTRAP_BLOCK_DRAWS = 1 << 22


def confusion_matrix(targets, predictions, num_classes):
    """num_classes x num_classes counts, rows = ground truth, columns = prediction."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets), np.asarray(predictions)), 1)
    return matrix


def _ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def score_matrices(matrices, classes):
    """The scores of confusion matrices stacked along leading axes (... x n x n), each scored alone: accuracy,
    macro-F1 over `classes`, bACC over the ones among them present in its ground truth (...), and each of `classes`'s
    precision, recall, F1 and support (... x len(classes)). A ratio with a zero denominator counts 0."""
    matrices = np.asarray(matrices, dtype=np.float64)
    true_positive = np.diagonal(matrices, axis1=-2, axis2=-1)
    support, predicted = matrices.sum(axis=-1), matrices.sum(axis=-2)
    recall = _ratio(true_positive, support)
    f1 = _ratio(2 * true_positive, support + predicted)[..., classes]
    # an absent class's recall is 0, so summing over all of `classes` sums over the present ones
    present = (support[..., classes] > 0).sum(axis=-1).astype(np.float64)
    return {"accuracy": _ratio(true_positive.sum(axis=-1), support.sum(axis=-1)),
            "macro_f1": f1.mean(axis=-1),
            "balanced_accuracy": _ratio(recall[..., classes].sum(axis=-1), present),
            "precision": _ratio(true_positive, predicted)[..., classes], "recall": recall[..., classes], "f1": f1,
            "support": support[..., classes]}


def scores_from_confusion(matrix, classes):
    """One confusion matrix's scores (see score_matrices): {accuracy, macro_f1, balanced_accuracy, per_class: [{class,
    precision, recall, F1, support}, ...]}."""
    scores = score_matrices(matrix, classes)
    return {**{name: float(scores[name]) for name in SCORES},
            "per_class": [{"class": int(c), **{name: float(scores[name][j]) for name in PER_CLASS},
                           "support": int(scores["support"][j])} for j, c in enumerate(classes)]}


def eight_way(logits, targets):
    logits, targets = np.asarray(logits), np.asarray(targets)
    num_classes = logits.shape[1]
    matrix = confusion_matrix(targets, logits.argmax(axis=1), num_classes)
    return {**scores_from_confusion(matrix, list(range(num_classes))), "confusion": matrix.tolist()}


def present_predictions(logits, present):
    """The argmax over the logits of the `present` classes only, as a class index of all the logits."""
    return np.asarray(present)[np.asarray(logits)[:, present].argmax(axis=1)]


def present_only(logits, targets):
    logits, targets = np.asarray(logits), np.asarray(targets)
    present = np.unique(targets)
    matrix = confusion_matrix(targets, present_predictions(logits, present), logits.shape[1])
    return {**scores_from_confusion(matrix, present.tolist()), "classes": present.tolist(),
            "confusion": matrix.tolist()}


def _units(count, groups):
    """(the unit each of `count` images belongs to, the number of units): the image itself, or its group."""
    unit_of = np.arange(count) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    return unit_of, int(unit_of.max()) + 1


def _resampled_unit_counts(num_units, resamples, seed):
    """The bootstrap's draws, in blocks: (start, counts), counts[i, u] how often resample start + i drew unit u (as
    float64, whose integers are exact far beyond any dataset's size). Each resample draws num_units units with
    replacement; the draws depend only on the seed and num_units."""
    rng = np.random.default_rng(seed)
    block = max(1, BOOTSTRAP_BLOCK_DRAWS // num_units)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        draws = rng.integers(0, num_units, size=(size, num_units))  # row i: the units of resample start + i
        drawn = np.bincount((draws + np.arange(size)[:, None] * num_units).ravel(), minlength=size * num_units)
        yield start, drawn.reshape(size, num_units).astype(np.float64)


def bootstrap(logits, targets, resamples, seed, groups=None):
    """Both protocols' scores on `resamples` bootstrap resamples: {protocol: {score: array}}, an array of `resamples`
    values for accuracy, macro-F1 and bACC, and `resamples` x classes for each class's precision, recall and F1 (the
    classes of that protocol, in the order of its per_class rows). `groups` (one id per image) makes each resample
    draw whole groups; None: each image alone. Present-only keeps the label set of the whole ground truth."""
    logits, targets = np.asarray(logits), np.asarray(targets)
    num_classes = logits.shape[1]
    unit_of, num_units = _units(len(targets), groups)
    present = np.unique(targets)
    protocols = {}
    for protocol, predictions, classes in (("eight_way", logits.argmax(axis=1), list(range(num_classes))),
                                           ("present_only", present_predictions(logits, present), present.tolist())):
        unit_counts = np.zeros((num_units, num_classes ** 2))  # each unit's confusion matrix, flattened
        np.add.at(unit_counts, (unit_of, targets * num_classes + predictions), 1)
        protocols[protocol] = unit_counts, classes
    samples = {protocol: {**{name: np.empty(resamples) for name in SCORES},
                          **{name: np.empty((resamples, len(classes))) for name in PER_CLASS}}
               for protocol, (_, classes) in protocols.items()}
    for start, drawn in _resampled_unit_counts(num_units, resamples, seed):
        # a resample's confusion matrix is the sum of its units' matrices, each as often as it was drawn
        for protocol, (unit_counts, classes) in protocols.items():
            resampled = score_matrices((drawn @ unit_counts).reshape(len(drawn), num_classes, num_classes), classes)
            for name, values in samples[protocol].items():
                values[start:start + len(drawn)] = resampled[name]
    return samples


def _regression_moments(prediction, target, unit_of, num_units):
    """units x 2 (valence, arousal) x 8 sums of each unit's rows: the count; p and t, p^2, t^2 and p t, where p and t
    are shifted by each column's first value (so that the variances are not differences of large numbers, and a
    constant column's are exactly 0); p - t and (p - t)^2, unshifted."""
    prediction, target = np.asarray(prediction, np.float64), np.asarray(target, np.float64)
    if prediction.shape != target.shape or prediction.shape[1:] != (len(VA_DIMENSIONS),) or len(prediction) == 0:
        raise ValueError(f"expected predictions and targets of valence and arousal, N x 2 each, N >= 1; got "
                         f"{prediction.shape} and {target.shape}")
    p, t = prediction - prediction[:1], target - target[:1]
    error = prediction - target
    per_row = np.stack([np.ones_like(p), p, t, p * p, t * t, p * t, error, error ** 2], axis=-1)
    moments = np.zeros((num_units, *per_row.shape[1:]))
    np.add.at(moments, unit_of, per_row)
    return moments


def _regression_scores(moments):
    """RMSE, Pearson's r and CCC from sums as _regression_moments gives them (... x 8), each over the leading axes. A
    constant prediction or target has r = 0 and CCC = 0."""
    count, sum_p, sum_t, sum_pp, sum_tt, sum_pt, sum_error, sum_squared_error = np.moveaxis(moments, -1, 0)
    mean_p, mean_t = sum_p / count, sum_t / count
    var_p, var_t = np.maximum(sum_pp / count - mean_p ** 2, 0), np.maximum(sum_tt / count - mean_t ** 2, 0)
    covariance = sum_pt / count - mean_p * mean_t
    return {"rmse": np.sqrt(sum_squared_error / count),
            "pearson_r": _ratio(covariance, np.sqrt(var_p * var_t)),
            "ccc": _ratio(2 * covariance, var_p + var_t + (sum_error / count) ** 2)}


def regression_metrics(prediction, target):
    """RMSE, Pearson's r and CCC of valence and arousal (N x 2 each), computed once over all rows:
    {dimension: {score: value}}."""
    moments = _regression_moments(prediction, target, np.zeros(len(prediction), np.int64), 1)[0]
    scores = _regression_scores(moments)
    return {dimension: {name: float(scores[name][d]) for name in REGRESSION_SCORES}
            for d, dimension in enumerate(VA_DIMENSIONS)}


def regression_bootstrap(prediction, target, resamples, seed, groups=None):
    """regression_metrics on `resamples` bootstrap resamples of the rows, or of their groups, drawn as `bootstrap`
    draws them: {dimension: {score: array of `resamples` values}}."""
    unit_of, num_units = _units(len(prediction), groups)
    moments = _regression_moments(prediction, target, unit_of, num_units).reshape(num_units, -1)
    samples = {dimension: {name: np.empty(resamples) for name in REGRESSION_SCORES} for dimension in VA_DIMENSIONS}
    for start, drawn in _resampled_unit_counts(num_units, resamples, seed):
        scores = _regression_scores((drawn @ moments).reshape(len(drawn), len(VA_DIMENSIONS), -1))
        for d, dimension in enumerate(VA_DIMENSIONS):
            for name in REGRESSION_SCORES:
                samples[dimension][name][start:start + len(drawn)] = scores[name][:, d]
    return samples


def intervals(samples, level=BOOTSTRAP_LEVEL):
    """The central `level` percentile interval of each score's bootstrap samples ({score: array}, as bootstrap returns
    them per protocol): {score: [low, high]}, or a list of [low, high] per class for a per-class score."""
    tail = 100 * (1 - level) / 2
    return {name: np.percentile(values, [tail, 100 - tail], axis=0).T.tolist() for name, values in samples.items()}


def attach_intervals(scores, samples, level=BOOTSTRAP_LEVEL):
    """Add to one protocol's scores (as eight_way or present_only return them) their bootstrap intervals: an
    "interval" of accuracy, macro-F1 and bACC, and one in each per-class row, of its precision, recall and F1."""
    bounds = intervals(samples, level)
    scores["interval"] = {name: bounds[name] for name in SCORES}
    for j, row in enumerate(scores["per_class"]):
        row["interval"] = {name: bounds[name][j] for name in PER_CLASS}
    return scores


# What the distillation terms act on ---------------------------------------------------------------------------

MECHANISMS = {  # name: what it measures, and the term meant to move it
    "teacher_agreement": "top-1 agreement with the KD teacher (logit KD raises it)",
    "proto_kd_kl": "mean KL of the class's Proto-KD target to the embedding's prototype distribution (Proto-KD lowers "
                   "it)",
    "positive_variance": "mean within-class variance of the unit embeddings of the positive classes (the variance cap "
                         "lowers it)",
    "class_mean_distance": "mean distance between the class means of the unit embeddings (the margin raises it)",
}


MECHANISM_SETS = ("ferplus_valid", "ferplus_test")  # where they are measured: the source domain the terms trained on


def _per_image_mechanisms(logits, embeddings, labels, target_table, bank, tau, teacher_logits):
    """N x 2: each image's agreement with the teacher (NaN without one) and its Proto-KD KL, as SPEC section 4 takes
    it (u = z / max(||z||, 1e-8), q = softmax over the unit prototypes' cosines / tau, 0 log 0 = 0)."""
    scores = unit_rows(embeddings) @ unit_rows(bank).T / tau
    log_q = scores - scores.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    target = np.asarray(target_table, np.float64)[labels]
    kl = np.where(target > 0, target * (np.log(np.where(target > 0, target, 1)) - log_q), 0).sum(axis=1)
    agreement = (np.full(len(labels), np.nan) if teacher_logits is None
                 else (np.asarray(logits).argmax(axis=1) == np.asarray(teacher_logits).argmax(axis=1)).astype(float))
    return np.stack([agreement, kl], axis=1)


def _geometry(weights, unit, labels, num_classes, positive):
    """The mean positive-class variance and the mean class-mean distance of the images counted by each row of weights
    (R x N: how often each image is drawn): R values each. A positive class counts where it holds 2 images or more, a
    class mean where it holds 1 or more; NaN where none does (or no pair)."""
    counts = np.stack([weights[:, labels == c].sum(axis=1) for c in range(num_classes)], axis=1)  # R x C
    sums = np.stack([weights[:, labels == c] @ unit[labels == c] for c in range(num_classes)], axis=1)  # R x C x D
    squares = np.stack([weights[:, labels == c] @ (unit[labels == c] ** 2).sum(axis=1) for c in range(num_classes)],
                       axis=1)
    capped = (counts >= 2) & np.asarray(positive)[None, :]
    first, second = np.triu_indices(num_classes, 1)
    pairs = (counts >= 1)[:, first] & (counts >= 1)[:, second]
    with np.errstate(invalid="ignore", divide="ignore"):  # an absent class's mean, and no class or pair at all
        means = sums / counts[..., None]
        variances = squares / counts - (means ** 2).sum(axis=-1)
        distances = np.linalg.norm(np.nan_to_num(means[:, first] - means[:, second]), axis=-1)
        return (np.where(capped, variances, 0).sum(axis=1) / capped.sum(axis=1),
                np.where(pairs, distances, 0).sum(axis=1) / pairs.sum(axis=1))


def mechanisms(logits, embeddings, labels, target_table, bank, tau, positive, resamples, seed, teacher_logits=None):
    """MECHANISMS measured on a set of images, and on `resamples` bootstrap resamples of them drawn as `bootstrap` draws
    them (so that two students' samples pair up): ({name: value}, {name: array of resamples}). teacher_agreement is NaN
    without teacher_logits."""
    labels = np.asarray(labels)
    per_image = _per_image_mechanisms(logits, embeddings, labels, target_table, bank, tau, teacher_logits)
    unit, num_classes = unit_rows(embeddings), np.asarray(target_table).shape[0]

    def measured(weights):
        means = weights @ per_image / weights.sum(axis=1, keepdims=True)
        variance, distance = _geometry(weights, unit, labels, num_classes, positive)
        return {"teacher_agreement": means[:, 0], "proto_kd_kl": means[:, 1], "positive_variance": variance,
                "class_mean_distance": distance}

    values = {name: float(value[0]) for name, value in measured(np.ones((1, len(labels)))).items()}
    samples = {name: np.empty(resamples) for name in MECHANISMS}
    for start, drawn in _resampled_unit_counts(len(labels), resamples, seed):
        for name, value in measured(drawn).items():
            samples[name][start:start + len(drawn)] = value
    return values, samples


def seed_interval(differences, level=BOOTSTRAP_LEVEL):
    """The mean of differences paired by training seed, its standard deviation (n - 1), Student's t interval of the
    mean (n - 1 degrees of freedom, taking the differences as normal), and how many are above 0."""
    import scipy.stats  # here: it takes half a second to import, and only stage 4 compares seeds

    n, mean, sd = len(differences), float(np.mean(differences)), float(np.std(differences, ddof=1))
    half_width = scipy.stats.t.ppf((1 + level) / 2, n - 1) * sd / np.sqrt(n)
    return {"mean": mean, "sd": sd, "interval": [mean - half_width, mean + half_width],
            "above_zero": int(sum(difference > 0 for difference in differences)), "values": list(differences)}


# Scores across students and training seeds --------------------------------------------------------------------

def score_readouts(readouts, data, resamples, seed):
    """The readouts scored against the ratings of the set's rated images, with bootstrap intervals over the images, or
    their groups: {"images", "readouts": {readout: {dimension: {score, ..., "interval"}}}}."""
    rated = ~np.isnan(data.va[:, 0])
    groups = None if data.groups is None else [group for group, kept in zip(data.groups, rated) if kept]
    scored = {}
    for readout, values in readouts.items():
        scored[readout] = regression_metrics(values[rated], data.va[rated])
        samples = regression_bootstrap(values[rated], data.va[rated], resamples, seed, groups)
        for dimension in VA_DIMENSIONS:
            scored[readout][dimension]["interval"] = intervals(samples[dimension])
    return {"images": int(rated.sum()), "readouts": scored}


def differences_from_reference(results, resampled, variants, datasets, reference):
    """Every other student's scores minus the reference student's, per dataset and protocol, with the
    paired-bootstrap interval of each difference: both students were scored on the same resamples of the images.
    Shaped as `results` is: {name: {dataset: {protocol: {score: difference, "interval": {score: [low, high]}}}}}."""

    def difference(name, key, protocol):
        mine, theirs = results[name][key][protocol], results[reference][key][protocol]
        mine_resampled, theirs_resampled = resampled[name][key][protocol], resampled[reference][key][protocol]
        spread = intervals({score: mine_resampled[score] - theirs_resampled[score] for score in SCORES})
        return {**{score: mine[score] - theirs[score] for score in SCORES}, "interval": spread}

    return {name: {key: {protocol: difference(name, key, protocol) for protocol in PROTOCOLS} for key, _, _ in datasets}
            for name, _ in variants if name != reference}


def across_seeds(results, groups, variants, datasets):
    """Each --replicates group's scores over its students: {group: {"students": [...], "seeds": [...], "datasets":
    {dataset: {protocol: {score: {"mean", "sd", "values"}}, and on a rated set "valence_arousal": {readout:
    {dimension: {score: {"mean", "sd", "values"}}}}}}}}; sd is the sample standard deviation (over n - 1)."""
    configs = dict(variants)

    def spread(values):
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)), "values": values}

    def on_dataset(names, key):
        scores = [results[name][key] for name in names]
        entry = {protocol: {score: spread([mine[protocol][score] for mine in scores]) for score in SCORES}
                 for protocol in PROTOCOLS}
        if "valence_arousal" in scores[0]:  # students trained alike have the same readouts
            readouts = [mine["valence_arousal"]["readouts"] for mine in scores]
            entry["valence_arousal"] = {readout: {dimension: {
                score: spread([mine[readout][dimension][score] for mine in readouts]) for score in REGRESSION_SCORES}
                for dimension in VA_DIMENSIONS} for readout in readouts[0]}
        return entry

    return {group: {"students": names, "seeds": [configs[name]["seed"] for name in names],
                    "datasets": {key: on_dataset(names, key) for key, _, _ in datasets}}
            for group, names in groups.items()}


def paired_across_seeds(replicates, reference_group):
    """Each other --replicates group's scores minus the reference group's, paired by training seed: {group: {"from",
    "seeds", "datasets": {dataset: {protocol: {score: difference}, and on a rated set "valence_arousal": {readout:
    {dimension: {score: difference}}} for the readouts both groups have}}}}, each difference {"mean", "sd",
    "interval", "above_zero", "values"}, over the seeds both groups have (a group sharing fewer than two with the
    reference is left out). A seed fixes the initial weights, the batch order and the augmentation, so a seed's two
    students differ chiefly by their recipe. The interval is Student's t interval of the mean difference (n - 1
    degrees of freedom), which takes the seeds' differences as normal."""
    reference = replicates[reference_group]
    paired_groups = {}
    for group, entry in replicates.items():
        seeds = sorted(set(entry["seeds"]) & set(reference["seeds"]))
        if group == reference_group or len(seeds) < 2:
            continue
        pairs = [(entry["seeds"].index(seed), reference["seeds"].index(seed)) for seed in seeds]

        def difference(mine, theirs):  # two groups' spreads of one score, as across_seeds gives them
            return seed_interval([mine["values"][i] - theirs["values"][j] for i, j in pairs])

        datasets = {}
        for key, mine in entry["datasets"].items():
            theirs = reference["datasets"][key]
            datasets[key] = {protocol: {score: difference(mine[protocol][score], theirs[protocol][score])
                                        for score in SCORES} for protocol in PROTOCOLS}
            if "valence_arousal" in mine:
                mine_va, theirs_va = mine["valence_arousal"], theirs["valence_arousal"]
                datasets[key]["valence_arousal"] = {readout: {dimension: {
                    score: difference(mine_va[readout][dimension][score], theirs_va[readout][dimension][score])
                    for score in REGRESSION_SCORES} for dimension in VA_DIMENSIONS}
                    for readout in mine_va if readout in theirs_va}
        paired_groups[group] = {"from": reference_group, "seeds": seeds, "datasets": datasets}
    return paired_groups


def summary_scores(scores):
    """One student's scores on one dataset as summary.json keeps them: metrics.json's, without the confusion
    matrices."""
    kept = {protocol: {**{score: scores[protocol][score] for score in SCORES}, "interval": scores[protocol]["interval"],
                       "per_class": scores[protocol]["per_class"]} for protocol in PROTOCOLS}
    if "valence_arousal" in scores:
        kept["valence_arousal"] = scores["valence_arousal"]
    return kept

