"""SPEC section 5 metrics, and those of valence and arousal, against hand computations."""

import numpy as np
import pytest

from ngd_ext import metrics
from ngd_ext.emotions import VA_DIMENSIONS
from ngd_ext.metrics import eight_way, present_only


def one_hot_logits(predictions, num_classes=8):
    return np.eye(num_classes)[predictions] + 0.01 * np.arange(num_classes)[::-1]  # ties impossible


def test_eight_way_by_hand():
    targets = [0, 0, 1, 1, 2, 2]
    predictions = [0, 1, 1, 1, 2, 5]
    scores = eight_way(one_hot_logits(predictions), targets)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # F1: class 0: P=1, R=1/2 -> 2/3; class 1: P=2/3, R=1 -> 4/5; class 2: P=1, R=1/2 -> 2/3; class 5: 0;
    # the four classes never predicted and absent count 0 as well.
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 2 / 3) / 8)
    assert scores["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)  # over present classes
    assert np.array(scores["confusion"]).sum() == 6


def test_present_only_restricts_the_argmax():
    targets = [0, 0, 1, 1]
    logits = np.zeros((4, 8))
    logits[0, [0, 5]] = [1, 3]   # 5 wins 8-way, 0 wins among present {0, 1}
    logits[1, [1, 6]] = [1, 3]   # 6 wins 8-way, 1 wins present-only
    logits[2, [1, 0]] = [2, 1]
    logits[3, [0, 7]] = [2, 9]
    scores = present_only(logits, targets)
    assert scores["classes"] == [0, 1]
    assert scores["accuracy"] == pytest.approx(2 / 4)
    # present-only predictions 0, 1, 1, 0: class 0 P=1/2 R=1/2, class 1 P=1/2 R=1/2
    assert scores["macro_f1"] == pytest.approx(0.5)
    assert scores["balanced_accuracy"] == pytest.approx(0.5)
    assert eight_way(logits, targets)["accuracy"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("seed", range(5))
def test_against_scikit_learn_with_absent_classes(seed):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    present = np.sort(rng.choice(8, size=5, replace=False))  # three classes absent from the ground truth
    targets = rng.choice(present, size=300)
    logits = rng.normal(size=(300, 8))
    logits[np.arange(300), targets] += 1.0  # better than chance, still many errors
    all_classes = list(range(8))

    predictions = logits.argmax(axis=1)
    scores = eight_way(logits, targets)
    assert scores["accuracy"] == pytest.approx(accuracy_score(targets, predictions), abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(
        f1_score(targets, predictions, labels=all_classes, average="macro", zero_division=0), abs=1e-12)
    with pytest.warns(UserWarning):  # scikit-learn warns of predicted classes absent from the ground truth
        expected_bacc = balanced_accuracy_score(targets, predictions)
    assert scores["balanced_accuracy"] == pytest.approx(expected_bacc, abs=1e-12)
    precision, recall, f1, support = precision_recall_fscore_support(targets, predictions, labels=all_classes,
                                                                     zero_division=0)
    for c, row in enumerate(scores["per_class"]):
        expected = (precision[c], recall[c], f1[c])
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(expected, abs=1e-12)
        assert row["support"] == support[c]

    restricted = present[logits[:, present].argmax(axis=1)]
    scores = present_only(logits, targets)
    assert scores["classes"] == present.tolist()
    assert scores["accuracy"] == pytest.approx(accuracy_score(targets, restricted), abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(
        f1_score(targets, restricted, labels=present, average="macro", zero_division=0), abs=1e-12)
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, restricted), abs=1e-12)
    assert [row["class"] for row in scores["per_class"]] == present.tolist()
    precision, recall, f1, _ = precision_recall_fscore_support(targets, restricted, labels=present, zero_division=0)
    assert [row["f1"] for row in scores["per_class"]] == pytest.approx(f1.tolist(), abs=1e-12)
    assert [row["precision"] for row in scores["per_class"]] == pytest.approx(precision.tolist(), abs=1e-12)


def scores_by_hand(targets, predictions, labels):
    """Accuracy, macro-F1 over `labels`, bACC over the classes present, and the precision, recall and F1 of each of
    `labels`, by scikit-learn."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, recall_score

    present = np.unique(targets)
    precision, recall, f1, _ = precision_recall_fscore_support(targets, predictions, labels=labels, zero_division=0)
    return {"accuracy": accuracy_score(targets, predictions),
            "macro_f1": f1_score(targets, predictions, labels=labels, average="macro", zero_division=0),
            "balanced_accuracy": recall_score(targets, predictions, labels=present, average="macro", zero_division=0),
            "precision": precision, "recall": recall, "f1": f1}


def assert_resample_scored(samples, i, expected):
    for name, value in expected.items():
        np.testing.assert_allclose(samples[name][i], value, atol=1e-12, err_msg=name)


def test_bootstrap_scores_each_resample_as_the_whole_set_is_scored(monkeypatch):
    rng = np.random.default_rng(4)
    targets = rng.choice([0, 1, 3, 4, 6], size=60)  # rare and absent classes, so resamples lose some
    targets[:2] = 7
    logits = rng.normal(size=(60, 8))
    logits[np.arange(60), targets] += 0.8
    monkeypatch.setattr(metrics, "BOOTSTRAP_BLOCK_DRAWS", 500)  # blocks of 8 resamples: the draws must not change
    resampled = metrics.bootstrap(logits, targets, 40, seed=11)
    draws = np.random.default_rng(11).integers(0, 60, size=(40, 60))
    present = np.unique(targets)
    restricted = present[logits[:, present].argmax(axis=1)]  # present-only keeps the whole set's label set
    for i, draw in enumerate(draws):
        assert_resample_scored(resampled["eight_way"], i, scores_by_hand(
            targets[draw], logits.argmax(axis=1)[draw], list(range(8))))
        assert_resample_scored(resampled["present_only"], i, scores_by_hand(targets[draw], restricted[draw], present))


def test_bootstrap_spread_of_accuracy_is_the_binomial_one():
    """Accuracy over n images has standard error sqrt(p (1 - p) / n); the 95% interval spans about 3.92 of it."""
    rng = np.random.default_rng(0)
    n = 2000
    targets = rng.integers(0, 8, n)
    predictions = np.where(rng.random(n) < 0.7, targets, (targets + 1) % 8)
    resampled = metrics.bootstrap(np.eye(8)[predictions], targets, 2000, seed=0)["eight_way"]
    p = (predictions == targets).mean()
    standard_error = np.sqrt(p * (1 - p) / n)
    assert resampled["accuracy"].std() == pytest.approx(standard_error, rel=0.08)
    low, high = metrics.intervals(resampled)["accuracy"]
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
    assert low < p < high


def test_two_students_share_the_resamples():
    """Equal seeds and image counts give equal draws, so a student scored against itself differs by exactly 0 on
    every resample, and a better student is better on every resample where it changes a prediction for the better."""
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 8, 300)
    worse = np.eye(8)[np.where(np.arange(300) < 150, targets, (targets + 1) % 8)]
    better = worse.copy()
    better[150:160] = np.eye(8)[targets[150:160]]  # ten more images right, nothing else changed
    worse_scores = metrics.bootstrap(worse, targets, 200, seed=5)["eight_way"]["accuracy"]
    better_scores = metrics.bootstrap(better, targets, 200, seed=5)["eight_way"]["accuracy"]
    assert np.array_equal(metrics.bootstrap(worse, targets, 200, seed=5)["eight_way"]["accuracy"], worse_scores)
    assert (better_scores >= worse_scores).all() and (better_scores > worse_scores).mean() > 0.99
    assert not np.array_equal(metrics.bootstrap(worse, targets, 200, seed=6)["eight_way"]["accuracy"], worse_scores)


def test_grouped_bootstrap_draws_whole_groups(monkeypatch):
    """Groups of 1 to 6 images (a CK+ subject's frames): each resample draws as many groups as there are, with
    replacement, and scores every image of every group drawn, as often as it was drawn."""
    rng = np.random.default_rng(9)
    sizes = rng.integers(1, 7, size=15)
    groups = np.repeat([f"S{100 + g}" for g in range(15)], sizes)
    rng.shuffle(groups)  # a group's images need not be neighbours
    targets = rng.integers(0, 8, len(groups))
    targets[:3] = [0, 2, 4]
    logits = rng.normal(size=(len(groups), 8))
    logits[np.arange(len(groups)), targets] += 1.0
    monkeypatch.setattr(metrics, "BOOTSTRAP_BLOCK_DRAWS", 40)  # blocks of 2 resamples
    resampled = metrics.bootstrap(logits, targets, 30, seed=2, groups=groups)
    draws = np.random.default_rng(2).integers(0, 15, size=(30, 15))
    names = np.unique(groups)  # the ids in sorted order, as drawn
    for i, draw in enumerate(draws):
        images = np.concatenate([np.flatnonzero(groups == names[g]) for g in draw])
        assert_resample_scored(resampled["eight_way"], i, scores_by_hand(
            targets[images], logits.argmax(axis=1)[images], list(range(8))))


def test_groups_of_one_image_are_the_ungrouped_bootstrap():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 8, 50)
    logits = rng.normal(size=(50, 8))
    alone = metrics.bootstrap(logits, targets, 100, seed=4)
    grouped = metrics.bootstrap(logits, targets, 100, seed=4, groups=np.arange(50))
    for protocol in metrics.PROTOCOLS:
        assert alone[protocol].keys() == grouped[protocol].keys()
        assert all(np.array_equal(alone[protocol][name], grouped[protocol][name]) for name in alone[protocol])


def test_grouped_intervals_are_wider_when_groups_hold_copies():
    """Each image shown four times: the image bootstrap takes the copies for independent images and halves the
    interval (1 / sqrt(4)); drawing the copies together gives back the interval of the images without copies."""
    rng = np.random.default_rng(5)
    targets = rng.integers(0, 8, 400)
    predictions = np.where(rng.random(400) < 0.6, targets, (targets + 3) % 8)
    logits = np.eye(8)[predictions]
    once = metrics.intervals(metrics.bootstrap(logits, targets, 2000, seed=0)["eight_way"])["accuracy"]
    copies = np.repeat(logits, 4, axis=0), np.repeat(targets, 4), np.repeat(np.arange(400), 4)
    as_images = metrics.intervals(metrics.bootstrap(*copies[:2], 2000, seed=0)["eight_way"])["accuracy"]
    as_groups = metrics.intervals(metrics.bootstrap(*copies[:2], 2000, seed=0, groups=copies[2])["eight_way"])
    width = once[1] - once[0]
    assert as_images[1] - as_images[0] == pytest.approx(width / 2, rel=0.15)
    assert as_groups["accuracy"] == pytest.approx(once, abs=1e-12)


def test_per_class_intervals_are_wider_for_a_rare_class():
    """500 images of one class and 12 of another, each recognised 80% of the time: F1 of the rare class rests on a
    handful of images and its interval is far wider. Classes never present nor predicted score 0 on every resample."""
    rng = np.random.default_rng(6)
    targets = np.repeat([0, 7], [500, 12])
    predictions = np.where(rng.random(len(targets)) < 0.8, targets, 3)
    logits = one_hot_logits(predictions)
    resampled = metrics.bootstrap(logits, targets, 2000, seed=1)
    eight = metrics.attach_intervals(eight_way(logits, targets), resampled["eight_way"])
    common, rare = eight["per_class"][0], eight["per_class"][7]
    assert rare["interval"]["f1"][1] - rare["interval"]["f1"][0] > 4 * (common["interval"]["f1"][1]
                                                                        - common["interval"]["f1"][0])
    for row in (common, rare):
        for name in metrics.PER_CLASS:
            low, high = row["interval"][name]
            assert low <= row[name] <= high
    assert common["interval"]["precision"] == [1.0, 1.0]  # nothing else is ever predicted as class 0
    assert eight["per_class"][5]["interval"] == {name: [0.0, 0.0] for name in metrics.PER_CLASS}
    assert eight["interval"]["accuracy"] == metrics.intervals(resampled["eight_way"])["accuracy"]

    present = metrics.attach_intervals(present_only(logits, targets), resampled["present_only"])
    assert [row["class"] for row in present["per_class"]] == [0, 7]
    # class 0's mistakes were class 3, which present-only cannot predict: among classes 0 and 7, class 0 always wins
    assert present["per_class"][0]["interval"]["recall"] == [1.0, 1.0]
    assert common["interval"]["recall"][1] < 0.85


def regression_by_hand(prediction, target):
    """RMSE, Pearson's r and CCC of each column, from their textbook definitions."""
    out = {}
    for d, dimension in enumerate(VA_DIMENSIONS):
        p, t = prediction[:, d], target[:, d]
        covariance = np.mean((p - p.mean()) * (t - t.mean()))
        out[dimension] = {"rmse": np.sqrt(np.mean((p - t) ** 2)), "pearson_r": np.corrcoef(p, t)[0, 1],
                          "ccc": 2 * covariance / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)}
    return out


def assert_regression_scores(got, expected):
    for dimension in VA_DIMENSIONS:
        for name in metrics.REGRESSION_SCORES:
            assert got[dimension][name] == pytest.approx(expected[dimension][name], abs=1e-12), (dimension, name)


def test_regression_metrics_by_hand():
    rng = np.random.default_rng(7)
    target = rng.uniform(-1, 1, (300, 2))
    prediction = 0.4 * target + rng.normal(0, 0.3, (300, 2)) + [0.2, -0.1]  # shrunk and shifted: CCC < r
    scores = metrics.regression_metrics(prediction, target)
    assert_regression_scores(scores, regression_by_hand(prediction, target))
    assert all(scores[d]["ccc"] < scores[d]["pearson_r"] for d in VA_DIMENSIONS)
    assert_regression_scores(metrics.regression_metrics(target, target),
                             {d: {"rmse": 0, "pearson_r": 1, "ccc": 1} for d in VA_DIMENSIONS})


def test_a_constant_prediction_has_no_correlation():
    """The mean baseline of stage 1: r and CCC exactly 0 (not a rounding error's worth either side), RMSE the
    target's spread about the constant."""
    target = np.random.default_rng(8).uniform(-1, 1, (101, 2))
    constant = np.broadcast_to(target.mean(axis=0) + 0.1, target.shape)
    scores = metrics.regression_metrics(constant, target)
    for d, dimension in enumerate(VA_DIMENSIONS):
        assert scores[dimension]["pearson_r"] == 0.0 and scores[dimension]["ccc"] == 0.0
        assert scores[dimension]["rmse"] == pytest.approx(np.sqrt(np.mean((target[:, d] - constant[:, d]) ** 2)))


@pytest.mark.parametrize("shapes", [((5, 2), (5, 3)), ((5, 3), (5, 3)), ((0, 2), (0, 2)), ((5,), (5,))])
def test_regression_metrics_need_valence_and_arousal_columns(shapes):
    with pytest.raises(ValueError, match=r"valence and arousal, N x 2 each, N >= 1; got"):
        metrics.regression_metrics(np.zeros(shapes[0]), np.zeros(shapes[1]))


def test_regression_bootstrap_scores_each_resample_as_the_whole_set_is_scored(monkeypatch):
    rng = np.random.default_rng(10)
    target = rng.uniform(-1, 1, (40, 2))
    prediction = 0.5 * target + rng.normal(0, 0.4, (40, 2))
    monkeypatch.setattr(metrics, "BOOTSTRAP_BLOCK_DRAWS", 120)  # blocks of 3 resamples: the draws must not change
    resampled = metrics.regression_bootstrap(prediction, target, 25, seed=3)
    draws = np.random.default_rng(3).integers(0, 40, size=(25, 40))  # the classification bootstrap's draws
    for i, draw in enumerate(draws):
        assert_regression_scores({d: {name: resampled[d][name][i] for name in metrics.REGRESSION_SCORES}
                                  for d in VA_DIMENSIONS}, regression_by_hand(prediction[draw], target[draw]))


def test_regression_bootstrap_draws_groups_of_copies_as_one():
    """Each rated image four times over: drawn as groups, the copies give the intervals of the images without copies
    (scores of means and variances do not change when every row is repeated alike); drawn one by one, narrower ones."""
    rng = np.random.default_rng(11)
    target = rng.uniform(-1, 1, (200, 2))
    prediction = 0.6 * target + rng.normal(0, 0.3, (200, 2))
    once = metrics.regression_bootstrap(prediction, target, 1000, seed=1)
    copies = np.repeat(prediction, 4, axis=0), np.repeat(target, 4, axis=0)
    as_groups = metrics.regression_bootstrap(*copies, 1000, seed=1, groups=np.repeat(np.arange(200), 4))
    as_images = metrics.regression_bootstrap(*copies, 1000, seed=1)
    for dimension in VA_DIMENSIONS:
        bounds = metrics.intervals(once[dimension])
        grouped = metrics.intervals(as_groups[dimension])
        assert all(grouped[name] == pytest.approx(bounds[name], abs=1e-9) for name in metrics.REGRESSION_SCORES)
        low, high = metrics.intervals(as_images[dimension])["ccc"]
        assert high - low == pytest.approx((bounds["ccc"][1] - bounds["ccc"][0]) / 2, rel=0.2)


def mechanisms_by_hand(logits, embeddings, labels, target, bank, tau, positive, teacher):
    """MECHANISMS with loops over images, classes and pairs; Proto-KD's KL from the reference op (SPEC section 4)."""
    import torch

    from ngd_ext import reference

    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    agreement = np.mean([np.argmax(s) == np.argmax(t) for s, t in zip(logits, teacher)])
    kl = reference.proto_dgeo_loss(torch.tensor(embeddings), torch.tensor(bank), torch.tensor(target),
                                   torch.tensor(labels), torch.tensor(positive), tau=tau)[0].item()
    means, variances = {}, []
    for c in sorted(set(labels.tolist())):
        members = unit[labels == c]
        means[c] = members.mean(axis=0)
        if positive[c] and len(members) >= 2:
            variances.append(np.mean([np.sum((u - means[c]) ** 2) for u in members]))
    distances = [np.linalg.norm(means[a] - means[b]) for a in means for b in means if a < b]
    return {"teacher_agreement": agreement, "proto_kd_kl": kl, "positive_variance": np.mean(variances),
            "class_mean_distance": np.mean(distances)}


def mechanism_case(seed=0, count=40):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1, 1, 1, 2, 2, 3] * (count // 7) + [3] * (count % 7))
    target = rng.dirichlet(np.ones(5), size=4)
    target[2, 1] = 0.0  # a zero in a target row: 0 log 0 = 0
    target[2] /= target[2].sum()
    return dict(logits=rng.normal(size=(count, 4)), embeddings=rng.normal(size=(count, 3)) * 3, labels=labels,
                target=target, bank=rng.normal(size=(5, 3)), tau=0.9,
                positive=np.array([False, True, True, False]), teacher=rng.normal(size=(count, 4)))


def test_mechanisms_against_a_direct_computation():
    case = mechanism_case()
    values, samples = metrics.mechanisms(case["logits"], case["embeddings"], case["labels"], case["target"],
                                         case["bank"], case["tau"], case["positive"], 30, 5, case["teacher"])
    expected = mechanisms_by_hand(**case)
    assert values == {name: pytest.approx(value, rel=1e-9) for name, value in expected.items()}
    draws = np.random.default_rng(5).integers(0, len(case["labels"]), size=(30, len(case["labels"])))
    for i in (0, 17, 29):  # each resample is measured as the drawn images (with their repeats) would be
        drawn = {**case, **{key: case[key][draws[i]] for key in ("logits", "embeddings", "labels", "teacher")}}
        for name, value in mechanisms_by_hand(**drawn).items():
            assert samples[name][i] == pytest.approx(value, rel=1e-9), (i, name)


def test_mechanisms_leave_out_what_does_not_apply():
    case = mechanism_case(count=7)  # class 3, the one positive class here, has one image
    values, samples = metrics.mechanisms(case["logits"], case["embeddings"], case["labels"], case["target"],
                                         case["bank"], case["tau"], np.array([False, False, False, True]), 10, 0)
    assert np.isnan(values["teacher_agreement"]) and np.isnan(values["positive_variance"])
    assert np.isfinite(values["class_mean_distance"]) and np.isfinite(samples["proto_kd_kl"]).all()


def test_seed_interval_is_students_t():
    spread = metrics.seed_interval([0.02, 0.05, -0.01])
    half = 4.302652729749464 * np.std([0.02, 0.05, -0.01], ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert spread["mean"] == pytest.approx(0.02) and spread["above_zero"] == 2
    assert spread["interval"] == pytest.approx([0.02 - half, 0.02 + half])
