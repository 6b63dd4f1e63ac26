"""Classification metrics of SPEC section 5, computed once over a whole prediction vector.

- 8-way: prediction = argmax over all logits; accuracy; macro-F1 = mean F1 over all classes (a class never
  predicted and absent counts 0); bACC = mean recall over the classes present in the ground truth.
- present-only: the classes present in the ground truth form the label set; prediction = argmax over their
  logits only; accuracy, macro-F1 and bACC over those classes.
"""

import numpy as np


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


def present_only(logits, targets):
    logits, targets = np.asarray(logits), np.asarray(targets)
    present = np.unique(targets)
    restricted = np.full_like(logits, -np.inf, dtype=np.float64)
    restricted[:, present] = logits[:, present]
    matrix = confusion_matrix(targets, restricted.argmax(axis=1), logits.shape[1])
    return {**scores_from_confusion(matrix, present.tolist()), "classes": present.tolist(),
            "confusion": matrix.tolist()}
