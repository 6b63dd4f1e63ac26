"""Classification metrics of SPEC section 5, computed once over a whole prediction vector.

- 8-way: prediction = argmax over all logits; accuracy; macro-F1 = mean F1 over all classes (a class never
  predicted and absent counts 0); bACC = mean recall over the classes present in the ground truth.
- present-only: the classes present in the ground truth form the label set; prediction = argmax over their
  logits only; accuracy, macro-F1 and bACC over those classes.

Their uncertainty comes from a percentile bootstrap: each resample draws as many images as there are, with
replacement, and is scored by the same rules. Where images come in groups that are not independent (the frames of a
CK+ subject), whole groups are drawn instead, as many as there are. The draws depend only on the seed and the number
of images or groups, so students scored on one dataset share them, and the difference of two students is a paired
bootstrap.
"""

import numpy as np

SCORES = ("accuracy", "macro_f1", "balanced_accuracy")
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


def scores_from_confusion(matrix, classes):
    """Accuracy, macro-F1 over `classes`, bACC over the ones among them present in the ground truth, and
    each class's precision, recall, F1 and support (a ratio with a zero denominator counts 0)."""
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    precision, recall = _ratio(true_positive, predicted), _ratio(true_positive, support)
    f1 = _ratio(2 * true_positive, support + predicted)
    present = [c for c in classes if support[c] > 0]
    return {"accuracy": float(true_positive.sum() / max(matrix.sum(), 1)),
            "macro_f1": float(f1[classes].mean()),
            "balanced_accuracy": float(recall[present].mean()) if present else 0.0,
            "per_class": [{"class": int(c), "precision": float(precision[c]), "recall": float(recall[c]),
                           "f1": float(f1[c]), "support": int(support[c])} for c in classes]}


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


def bootstrap(logits, targets, resamples, seed, groups=None):
    """Both protocols' scores on `resamples` bootstrap resamples: {protocol: resamples x 3 array of accuracy, macro-F1
    and bACC}. `groups` (one id per image) makes each resample draw whole groups; None: each image alone. Present-only
    keeps the label set of the whole ground truth."""
    logits, targets = np.asarray(logits), np.asarray(targets)
    num_classes, count = logits.shape[1], len(targets)
    unit_of = np.arange(count) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    num_units = int(unit_of.max()) + 1
    present = np.unique(targets)
    protocols = {}
    for protocol, predictions, classes in (("eight_way", logits.argmax(axis=1), list(range(num_classes))),
                                           ("present_only", present_predictions(logits, present), present.tolist())):
        unit_counts = np.zeros((num_units, num_classes ** 2))  # each unit's confusion matrix, flattened
        np.add.at(unit_counts, (unit_of, targets * num_classes + predictions), 1)
        protocols[protocol] = unit_counts, classes
    scores = {protocol: np.empty((resamples, len(SCORES))) for protocol in PROTOCOLS}
    rng = np.random.default_rng(seed)
    block = max(1, BOOTSTRAP_BLOCK_DRAWS // num_units)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        draws = rng.integers(0, num_units, size=(size, num_units))  # row i: the units of resample start + i
        # how often each resample drew each unit; its confusion matrix is then a sum of units' matrices (exact in
        # float64, whose integers are exact far beyond any dataset's size)
        drawn = np.bincount((draws + np.arange(size)[:, None] * num_units).ravel(), minlength=size * num_units)
        drawn = drawn.reshape(size, num_units).astype(np.float64)
        for protocol, (unit_counts, classes) in protocols.items():
            matrices = (drawn @ unit_counts).astype(np.int64).reshape(size, num_classes, num_classes)
            for i, matrix in enumerate(matrices):
                resampled = scores_from_confusion(matrix, classes)
                scores[protocol][start + i] = [resampled[name] for name in SCORES]
    return scores


def intervals(samples, level=BOOTSTRAP_LEVEL):
    """The central `level` percentile interval of bootstrap samples (resamples x 3, as bootstrap returns them), per
    score: {score: [low, high]}."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return {score: [float(low[i]), float(high[i])] for i, score in enumerate(SCORES)}
