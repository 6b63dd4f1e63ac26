"""The Proto-KD + D-Geo losses (SPEC section 4) in plain PyTorch, written for clarity.

This is the definition the fused op is tested against, and the fallback where the op is not built.
"""

import math

import torch
import torch.nn.functional as F

NORM_EPS = 1e-8
DIST_EPS = 1e-12
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_inputs(z, protos, target, labels, positive, tau, var_cap, margin):
    """Raise a ValueError naming the argument for inputs the op does not accept.

    Shapes, dtypes and devices are checked everywhere; values (labels in range, target rows that are
    distributions, a finite z) only on CPU, since on a GPU each would cost a host synchronisation.
    """
    if z.dim() != 2:
        raise ValueError(f"proto_dgeo_loss: z must be 2-D (B x D), got shape {list(z.shape)}")
    if z.dtype not in FLOAT_DTYPES:
        raise ValueError(f"proto_dgeo_loss: z must be float32, float64, bfloat16 or float16, got {z.dtype}")
    batch, dim = z.shape
    if batch == 0:
        raise ValueError("proto_dgeo_loss: z is empty (B = 0); the loss of an empty batch is undefined")
    if dim == 0:
        raise ValueError("proto_dgeo_loss: z has no features (D = 0)")
    if protos.dim() != 2 or protos.shape[1] != dim or protos.shape[0] == 0:
        raise ValueError(f"proto_dgeo_loss: protos must be K x D with K >= 1 and D = {dim} (z's width), "
                         f"got shape {list(protos.shape)}")
    if not protos.is_floating_point():
        raise ValueError(f"proto_dgeo_loss: protos must be floating point, got {protos.dtype}")
    num_protos = protos.shape[0]
    if target.dim() != 2 or target.shape[1] != num_protos or target.shape[0] == 0:
        raise ValueError(f"proto_dgeo_loss: target must be C x K with C >= 1 and K = {num_protos} "
                         f"(the number of prototypes), got shape {list(target.shape)}")
    if not target.is_floating_point():
        raise ValueError(f"proto_dgeo_loss: target must be floating point, got {target.dtype}")
    num_classes = target.shape[0]
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"proto_dgeo_loss: labels must be 1-D of length B = {batch}, got shape {list(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"proto_dgeo_loss: labels must be int64, got {labels.dtype}")
    if positive.dim() != 1 or positive.shape[0] != num_classes:
        raise ValueError(f"proto_dgeo_loss: positive must be 1-D of length C = {num_classes}, "
                         f"got shape {list(positive.shape)}")
    if positive.dtype != torch.bool:
        raise ValueError(f"proto_dgeo_loss: positive must be bool, got {positive.dtype}")
    for name, tensor in (("protos", protos), ("target", target), ("labels", labels), ("positive", positive)):
        if tensor.device != z.device:
            raise ValueError(f"proto_dgeo_loss: {name} is on {tensor.device} but z is on {z.device}; "
                             "all inputs must be on one device")
    if torch.is_grad_enabled():
        check_constants(protos, target)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"proto_dgeo_loss: tau must be a positive finite number, got {tau}")
    for name, value in (("var_cap", var_cap), ("margin", margin)):
        if not math.isfinite(value):
            raise ValueError(f"proto_dgeo_loss: {name} must be finite, got {value}")
    if z.device.type != "cpu":
        return
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = bad[0, 0].item()
        raise ValueError(f"proto_dgeo_loss: labels[{i}] = {labels[i].item()} is out of range [0, {num_classes})")
    rows = target.double()
    if not torch.isfinite(rows).all() or (rows < 0).any():
        c, k = (~torch.isfinite(rows) | (rows < 0)).nonzero()[0].tolist()
        raise ValueError(f"proto_dgeo_loss: target[{c}, {k}] = {rows[c, k].item()}; target rows must be "
                         "distributions (finite, non-negative, summing to 1)")
    tolerance = 1e-2 if target.dtype in (torch.float16, torch.bfloat16) else 1e-4
    sums = rows.sum(1)
    off = ((sums - 1).abs() > tolerance).nonzero()
    if len(off):
        c = off[0, 0].item()
        raise ValueError(f"proto_dgeo_loss: target row {c} sums to {sums[c].item()}; target rows must be "
                         "distributions (non-negative, summing to 1)")
    finite_rows = torch.isfinite(z).all(1)
    if not finite_rows.all():
        raise ValueError(f"proto_dgeo_loss: z has a non-finite value in row {(~finite_rows).nonzero()[0, 0].item()}")


def check_constants(protos, target):
    """Raise a ValueError for a prototype bank or target that asks for a gradient: the loss gives one to z only
    (SPEC section 4), and silently leaving a learnable bank unchanged would be worse than refusing it."""
    for name, tensor in (("protos", protos), ("target", target)):
        if tensor.requires_grad:
            raise ValueError(f"proto_dgeo_loss: {name} requires grad, but the loss gives a gradient with respect to z "
                             f"only; pass {name}.detach() to use it as the constant it is")


def proto_dgeo_loss(z, protos, target, labels, positive, tau=0.9, var_cap=0.2, margin=0.5):
    """Return (proto_kd, var_cap_loss, margin_loss) as defined in SPEC section 4.

    z: B x D student embeddings (the only input with a gradient); protos: K x D prototype bank;
    target: C x K Proto-KD target distributions; labels: B int64 class indices; positive: C bool mask of
    the classes under the variance cap. Losses are float64 for float64 z and float32 otherwise.
    """
    check_inputs(z, protos, target, labels, positive, tau, var_cap, margin)
    return proto_dgeo_terms(z, protos, target, labels, positive, tau, var_cap, margin)


def proto_dgeo_terms(z, protos, target, labels, positive, tau, var_cap, margin):
    """The math of proto_dgeo_loss without the input checks (data-dependent, so they break torch.compile)."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    num_classes = target.shape[0]

    unit = F.normalize(z.to(dtype), dim=1, eps=NORM_EPS)
    unit_protos = F.normalize(protos.to(dtype), dim=1, eps=NORM_EPS)
    log_q = F.log_softmax(unit @ unit_protos.T / tau, dim=1)
    proto_kd = F.kl_div(log_q, target.to(dtype)[labels], reduction="batchmean")

    counts = torch.bincount(labels, minlength=num_classes)
    members = counts.clamp_min(1).to(dtype)
    means = torch.zeros(num_classes, z.shape[1], dtype=dtype, device=z.device).index_add_(0, labels, unit)
    means = means / members[:, None]
    spread = ((unit - means[labels]) ** 2).sum(1)
    variances = torch.zeros(num_classes, dtype=dtype, device=z.device).index_add_(0, labels, spread) / members

    capped = positive & (counts >= 2)
    excess = torch.relu(variances - var_cap) ** 2
    var_cap_loss = torch.where(capped, excess, 0).sum() / capped.sum().clamp_min(1)

    present = counts > 0
    upper = torch.ones(num_classes, num_classes, dtype=torch.bool, device=z.device).triu(1)
    pairs = present[:, None] & present[None, :] & upper
    distances = torch.sqrt(((means[:, None, :] - means[None, :, :]) ** 2).sum(-1) + DIST_EPS)
    shortfall = torch.relu(margin - distances) ** 2
    margin_loss = torch.where(pairs, shortfall, 0).sum() / pairs.sum().clamp_min(1)
    return proto_kd, var_cap_loss, margin_loss
