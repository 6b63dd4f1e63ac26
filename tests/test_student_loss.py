"""The student's loss terms against hand computations: logit KD of both kinds, the class weights of each choice, the
D-Geo ramp, and the gradient shares; and the warning stage 3 gives of a term that barely acts."""

import math

import numpy as np
import pytest
import torch

import ngd_ext
import stage3_student
from ngd_ext import artifacts, reference
from ngd_ext.emotions import DEFAULT_ANCHORS, FER_CLASSES
from ngd_ext.prototypes import proto_kd_targets
from ngd_ext.student_loss import ProtoDGeoLoss, StudentLoss, class_weights, dgeo_ramp, gradient_shares, kd_loss

STUDENT = [[2.0, 0.0, -1.0, 0.5], [-0.5, 1.5, 0.0, 0.0]]
TEACHER = [[0.0, 1.0, 0.0, 3.0], [1.0, 1.0, -2.0, 0.0]]


def softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def test_kd_mse_is_the_mean_squared_difference_of_the_raw_logits():
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    loss = kd_loss(student, torch.tensor(TEACHER, dtype=torch.float64), "mse")
    squares = [(s - t) ** 2 for rows in zip(STUDENT, TEACHER) for s, t in zip(*rows)]
    assert loss.item() == pytest.approx(sum(squares) / 8, rel=1e-12)  # 2 images x 4 classes
    loss.backward()
    expected = [[2 * (s - t) / 8 for s, t in zip(*rows)] for rows in zip(STUDENT, TEACHER)]
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_kd_kl_is_t_squared_kl_of_the_softened_teacher_to_the_student(temperature):
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    loss = kd_loss(student, torch.tensor(TEACHER, dtype=torch.float64), "kl", temperature)
    kl = sum(t * math.log(t / s) for rows in zip(STUDENT, TEACHER)
             for s, t in zip(softmax(rows[0], temperature), softmax(rows[1], temperature)))
    assert loss.item() == pytest.approx(temperature ** 2 * kl / 2, rel=1e-12)  # averaged over the 2 images
    loss.backward()
    # d/ds of T^2 KL(p_t || p_s) / B = T (p_s - p_t) / B
    expected = [[temperature * (s - t) / 2 for s, t in zip(softmax(rows[0], temperature),
                                                           softmax(rows[1], temperature))]
                for rows in zip(STUDENT, TEACHER)]
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-10)


def test_class_weights_of_each_choice():
    counts = [8740, 7528, 3562, 3014, 2466, 0, 652, 119]  # an absent class weighs 0 but for 'none'
    present = [c for c in counts if c]
    sqrt_inverse = [c ** -0.5 for c in present]
    inverse = [1 / c for c in present]
    expected = {"sqrt-inverse": [w / (sum(sqrt_inverse) / 7) for w in sqrt_inverse],
                "inverse": [w / (sum(inverse) / 7) for w in inverse]}
    for choice, weights in expected.items():
        got = class_weights(counts, choice).tolist()
        assert got[5] == 0.0
        np.testing.assert_allclose(got[:5] + got[6:], weights, rtol=1e-6)
        assert np.mean(got[:5] + got[6:]) == pytest.approx(1.0, rel=1e-6)
    assert class_weights(counts, "none").tolist() == [1.0] * 8
    assert class_weights(counts, [1, 2, 3, 4, 5, 6, 7, 8.5]).tolist() == [1, 2, 3, 4, 5, 6, 7, 8.5]
    np.testing.assert_allclose(class_weights(counts, "inverse")[7] / class_weights(counts, "inverse")[0],
                               8740 / 119, rtol=1e-6)  # plain inverse weights span 73x on FERPlus


def test_dgeo_ramp():
    ramp = [dgeo_ramp(e, 20, 60) for e in (0, 19, 20, 30, 40, 60, 99)]
    assert ramp == pytest.approx([0.0, 0.0, 0.0, (1 - np.cos(np.pi / 4)) / 2, 0.5, 1.0, 1.0], abs=1e-15)


def test_gradient_shares_are_the_weighted_gradient_norms_over_ces():
    logits = torch.tensor(STUDENT, requires_grad=True)
    z = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    values = {"ce": (logits ** 2).sum(), "kd": logits.sum(), "proto_kd": (z ** 3).sum(), "margin": z.sum()}
    shares = gradient_shares(values, {"ce": 1.0, "kd": 0.5, "proto_kd": 0.1, "margin": 0.0}, [logits, z])
    ce_norm = 2 * math.sqrt(sum(v * v for row in STUDENT for v in row))
    assert set(shares) == {"kd", "proto_kd"}  # a term of weight 0 pulls on nothing
    assert shares["kd"] == pytest.approx(0.5 * math.sqrt(8) / ce_norm, rel=1e-6)
    assert shares["proto_kd"] == pytest.approx(0.1 * 3 * math.sqrt(1 + 16 + 81 + 1) / ce_norm, rel=1e-6)


def epoch_one(weighted, shares):
    return {"epoch": 1, "weighted": {"ce": 2.0, **weighted}, "gradient_share": shares}


def test_a_term_under_one_percent_of_ce_by_value_and_by_gradient_is_named(capsys):
    weights = {"ce": 1.0, "kd": 0.3, "proto_kd": 1e-4, "var_cap": 0.0, "margin": 0.0}
    stage3_student.warn_of_inert_terms(epoch_one({"kd": 0.6, "proto_kd": 1e-5, "var_cap": 0.0, "margin": 0.0},
                                                 {"kd": 0.4, "proto_kd": 2e-4}), weights)
    assert capsys.readouterr().err == ("warning: proto_kd barely acts: in epoch 1, at weight 0.0001, it was 0.00% of "
                                       "CE by value and 0.02% by gradient (under 1% both); raise its weight, or see "
                                       "history.jsonl\n")
    # small in value but pulling hard (Proto-KD on the projection head, which CE never reaches): not inert
    stage3_student.warn_of_inert_terms(epoch_one({"kd": 0.6, "proto_kd": 0.014, "var_cap": 0.0, "margin": 0.0},
                                                 {"kd": 0.4, "proto_kd": 0.02}), {**weights, "proto_kd": 0.12})
    later = {**epoch_one({"kd": 0.0, "proto_kd": 0.0, "var_cap": 0.0, "margin": 0.0}, {}), "epoch": 2}
    stage3_student.warn_of_inert_terms(later, weights)  # judged after the first epoch only
    assert capsys.readouterr().err == ""



@pytest.fixture
def bank_folder(tmp_path):
    """A stage-2 folder holding a bank of 25 prototypes of 16 dimensions, with its manifest."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(25, 16))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    np.savez(tmp_path / "prototypes.npz", bank=bank.astype(np.float32), G=5, filled_from=np.arange(25))
    artifacts.write_manifest(str(tmp_path))
    return tmp_path


def test_proto_dgeo_loss_module_is_the_op_with_the_banks_constants(bank_folder):
    loss = ProtoDGeoLoss.from_bank(str(bank_folder / "prototypes.npz"), tau=0.8, var_cap=0.1, margin=0.7)
    with np.load(bank_folder / "prototypes.npz") as saved:
        bank = saved["bank"].astype(np.float64)
    target = proto_kd_targets(bank, 5, [DEFAULT_ANCHORS[name] for name in FER_CLASSES], 0.8)
    positive = torch.tensor([name in ("happiness", "surprise") for name in FER_CLASSES])
    z, labels = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 8
    got = loss(z, labels)
    want = ngd_ext.proto_dgeo_loss(z, torch.tensor(bank, dtype=torch.float32),
                                   torch.tensor(target, dtype=torch.float32), labels, positive, 0.8, 0.1, 0.7)
    assert loss.embedding_dim == 16 and got._fields == ("proto_kd", "var_cap", "margin")
    for name, value, expected in zip(got._fields, got, want):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    assert {name for name, _ in loss.named_buffers()} == {"protos", "target", "positive"}
    assert (loss.bank_sha256, loss.grid) == (artifacts.sha256_file(str(bank_folder / "prototypes.npz")), 5)


def test_proto_dgeo_loss_module_refuses_a_bank_that_changed(bank_folder):
    with open(bank_folder / "prototypes.npz", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(artifacts.ArtifactError, match=r"prototypes.npz does not match SHA256SUMS"):
        ProtoDGeoLoss.from_bank(str(bank_folder / "prototypes.npz"))


def test_student_loss_is_ce_kd_proto_kd_and_dgeo_under_its_ramp(bank_folder):
    """StudentLoss against SPEC section 4 written out: the reference op, cross-entropy and KD by hand."""
    proto_dgeo = ProtoDGeoLoss.from_bank(str(bank_folder / "prototypes.npz"))
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0, 3.0, 1.0, 0.2])
    loss = StudentLoss(proto_dgeo, weights, kd_weight=0.3, proto_weight=0.12, dgeo_weight=0.5, ramp=(2, 6))
    generator = torch.Generator().manual_seed(2)
    logits, teacher = torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator)
    z, labels = torch.randn(32, 16, generator=generator), torch.arange(32) % 8
    for epoch, ramp in ((1, 0.0), (4, 0.5), (7, 1.0)):  # w(e) = (1 - cos(pi (e - 2) / 4)) / 2 between 2 and 6
        values = loss(logits, z, labels, teacher, epoch=epoch)
        ce = torch.nn.functional.cross_entropy(logits, labels, weight=weights, label_smoothing=0.055)
        proto_kd, var_cap, margin = reference.proto_dgeo_loss(z, proto_dgeo.protos, proto_dgeo.target, labels,
                                                              proto_dgeo.positive)
        total = ce + 0.3 * (logits - teacher).pow(2).mean() + 0.12 * proto_kd + 0.5 * ramp * (var_cap + margin)
        torch.testing.assert_close(values["total"], total, rtol=1e-5, atol=1e-6, msg=str(epoch))
        assert loss.weights(epoch)["margin"] == pytest.approx(0.5 * ramp)
