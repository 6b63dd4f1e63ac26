"""The student's loss of SPEC section 4 as modules to drop into a training loop: ProtoDGeoLoss (Proto-KD and D-Geo with
the bank's constants) and StudentLoss (CE with its class weights, logit KD from a visual teacher, and ProtoDGeoLoss
under D-Geo's ramp); the pieces they are made of; and how much each term weighs in training, by value and by
gradient."""

import math
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ngd_ext.emotions import DEFAULT_ANCHORS, DEFAULT_POSITIVE, FER_CLASSES
from ngd_ext.ops import proto_dgeo_loss
from ngd_ext.prototypes import load_bank, proto_kd_targets

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


class ProtoDGeoTerms(NamedTuple):
    proto_kd: torch.Tensor
    var_cap: torch.Tensor
    margin: torch.Tensor


class ProtoDGeoLoss(nn.Module):
    """Proto-KD and D-Geo of SPEC section 4 with their constants held as buffers (they move with .to(device)): the
    prototype bank (K x E), the Proto-KD target table (C x K), the positive classes (C). forward(z, labels) gives the
    named triple (proto_kd, var_cap, margin) through the fused op where it is built, the reference otherwise. Built by
    from_bank, it also says which bank it holds: bank_sha256 and grid (None otherwise)."""

    def __init__(self, protos, target, positive, tau=0.9, var_cap=0.2, margin=0.5):
        super().__init__()
        self.register_buffer("protos", torch.as_tensor(protos, dtype=torch.float32))
        self.register_buffer("target", torch.as_tensor(target, dtype=torch.float32))
        self.register_buffer("positive", torch.as_tensor(positive, dtype=torch.bool))
        self.tau, self.var_cap, self.margin = tau, var_cap, margin
        self.bank_sha256 = self.grid = None

    @classmethod
    def from_bank(cls, path, tau=0.9, var_cap=0.2, margin=0.5, anchors=None, positive=DEFAULT_POSITIVE):
        """From a stage-2 prototypes.npz, checked first against its folder's manifest: the targets of the classes'
        V/A anchors (SPEC section 3's by default, a dict of FERPlus class -> (valence, arousal) otherwise)."""
        bank_hash, bank, grid, _ = load_bank(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
        anchors = [(anchors or DEFAULT_ANCHORS)[name] for name in FER_CLASSES]
        loss = cls(bank, proto_kd_targets(bank, grid, anchors, tau), [name in positive for name in FER_CLASSES], tau,
                   var_cap, margin)
        loss.bank_sha256, loss.grid = bank_hash, grid
        return loss

    @property
    def embedding_dim(self):
        """The width E that z must have: the bank's."""
        return self.protos.shape[1]

    def forward(self, z, labels):
        return ProtoDGeoTerms(*proto_dgeo_loss(z, self.protos, self.target, labels, self.positive, self.tau,
                                               self.var_cap, self.margin))


class StudentLoss(nn.Module):
    """The student's loss as stage 3 takes it: CE (label smoothing, class weights) + kd_weight KD + proto_weight
    Proto-KD + dgeo_weight w(e) (VarCap + Margin), w the D-Geo ramp over epochs ramp = (start, end). forward gives
    every term, unweighted, and `total`, the weighted sum to minimise."""

    def __init__(self, proto_dgeo, class_weights=None, kd_weight=0.30, proto_weight=0.12, dgeo_weight=0.012,
                 kd_loss="mse", kd_temperature=KD_TEMPERATURE, label_smoothing=LABEL_SMOOTHING, ramp=(20, 60)):
        super().__init__()
        self.proto_dgeo = proto_dgeo
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.as_tensor(class_weights, dtype=torch.float32))
        self.kd_weight, self.proto_weight, self.dgeo_weight = kd_weight, proto_weight, dgeo_weight
        self.kd_loss, self.kd_temperature, self.label_smoothing, self.ramp = (kd_loss, kd_temperature,
                                                                               label_smoothing, ramp)

    def weights(self, epoch):
        """Each term's weight in the total in epoch `epoch` (counted from 0): {term: weight}."""
        dgeo = self.dgeo_weight * dgeo_ramp(epoch, *self.ramp)
        return {"ce": 1.0, "kd": self.kd_weight, "proto_kd": self.proto_weight, "var_cap": dgeo, "margin": dgeo}

    def forward(self, logits, z, labels, teacher_logits=None, epoch=0, ce_target=None):
        """logits B x C and z B x E, the student's two heads; labels B; teacher_logits B x C for KD (None: none);
        ce_target the CE target where it is not the labels (FERPlus's probability rule: B x C distributions)."""
        ce = F.cross_entropy(logits.float(), labels if ce_target is None else ce_target, weight=self.class_weights,
                             label_smoothing=self.label_smoothing)
        kd = ce.new_zeros(()) if teacher_logits is None else kd_loss(logits.float(), teacher_logits.float(),
                                                                    self.kd_loss, self.kd_temperature)
        proto_kd, var_cap, margin = self.proto_dgeo(z.float(), labels)
        values = {"ce": ce, "kd": kd, "proto_kd": proto_kd, "var_cap": var_cap, "margin": margin}
        values["total"] = sum(weight * values[term] for term, weight in self.weights(epoch).items())
        return values


def gradient_shares(values, weights, outputs):
    """{term: the norm of its weighted gradient with respect to the student's outputs (logits and projection, as a
    list of tensors), over CE's}, the terms of weight 0 aside: how hard each term pulls on the network against CE."""
    def norm(loss):
        grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))

    ce = norm(values["ce"])
    return {term: norm(weight * values[term]) / ce for term, weight in weights.items() if term != "ce" and weight > 0}

