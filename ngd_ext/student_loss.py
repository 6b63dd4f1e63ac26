"""The student's loss of SPEC section 4, term by term: cross-entropy (label smoothing, class weights), logit KD from a
visual teacher, Proto-KD, and D-Geo's variance cap and inter-class margin under their ramp; and how much each term
weighs in training, by value and by gradient."""

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ngd_ext.ops import proto_dgeo_loss

LABEL_SMOOTHING = 0.055
KD_TEMPERATURE = 5.0
TERMS = ("total", "ce", "kd", "proto_kd", "var_cap", "margin")
CLASS_WEIGHTINGS = ("sqrt-inverse", "inverse", "none")
INERT_SHARE = 0.01  # a weighted term under this share of CE, by value and by gradient, barely trains anything


def class_weights(counts, weighting):
    """CE's class weights from the training set's class counts: 'sqrt-inverse' (1/n_c)^0.5 or 'inverse' 1/n_c, each
    normalised to mean 1 over the classes present (an absent class weighs 0); 'none' all 1; or a list, as given."""
    counts = np.asarray(counts, dtype=np.float64)
    if not isinstance(weighting, str):
        return torch.tensor(weighting, dtype=torch.float32)
    if weighting == "none":
        return torch.ones(len(counts))
    power = {"sqrt-inverse": 0.5, "inverse": 1.0}[weighting]
    weights = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def kd_loss(student_logits, teacher_logits, kind="mse", temperature=KD_TEMPERATURE):
    """Logit distillation: 'mse', the mean over the batch and the classes of the raw logits' squared difference (logit
    matching: no temperature), or 'kl', T^2 KL(softmax(t / T) || softmax(s / T)) averaged over the batch."""
    if kind == "mse":
        return (student_logits - teacher_logits).pow(2).mean()
    student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return temperature ** 2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def dgeo_ramp(epoch, start, end):
    """w(e) of SPEC section 4 (epochs counted from 0): 0 before start, a half cosine up to 1 at end."""
    if epoch < start:
        return 0.0
    if epoch >= end:
        return 1.0
    return (1 - math.cos(math.pi * (epoch - start) / (end - start))) / 2


def term_weights(settings, ramp):
    """Each term's weight in the total at D-Geo ramp `ramp`: {term: weight} (settings: kd_weight, proto_weight,
    dgeo_weight)."""
    dgeo = settings.dgeo_weight * ramp
    return {"ce": 1.0, "kd": settings.kd_weight, "proto_kd": settings.proto_weight, "var_cap": dgeo, "margin": dgeo}


def loss_terms(logits, z, labels, ce_target, teacher_logits, ramp, settings, constants):
    """The loss over a batch, term by term, unweighted, and `total`, the weighted sum to minimise. teacher_logits is
    None without KD; ce_target is the labels, or class distributions (FERPlus's probability rule). settings holds the
    weights, tau, var_cap, margin, kd_loss and kd_temperature; constants the class weights and the op's constants."""
    ce = F.cross_entropy(logits.float(), ce_target, weight=constants.class_weights, label_smoothing=LABEL_SMOOTHING)
    kd = ce.new_zeros(()) if teacher_logits is None else kd_loss(logits.float(), teacher_logits.float(),
                                                                settings.kd_loss, settings.kd_temperature)
    proto_kd, var_cap, margin = proto_dgeo_loss(z.float(), constants.protos, constants.target_table, labels,
                                                constants.positive, settings.tau, settings.var_cap, settings.margin)
    values = {"ce": ce, "kd": kd, "proto_kd": proto_kd, "var_cap": var_cap, "margin": margin}
    values["total"] = sum(weight * values[term] for term, weight in term_weights(settings, ramp).items())
    return values


def gradient_shares(values, weights, outputs):
    """{term: the norm of its weighted gradient with respect to the student's outputs (logits and projection, as a
    list of tensors), over CE's}, the terms of weight 0 aside: how hard each term pulls on the network against CE."""
    def norm(loss):
        grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))

    ce = norm(values["ce"])
    return {term: norm(weight * values[term]) / ce for term, weight in weights.items() if term != "ce" and weight > 0}


class LossConstants(NamedTuple):
    """What the loss takes besides the batch: CE's class weights, and the Proto-KD + D-Geo op's prototypes (K x E),
    Proto-KD target table (C x K) and positive classes (C, bool)."""
    class_weights: torch.Tensor
    protos: torch.Tensor
    target_table: torch.Tensor
    positive: torch.Tensor
