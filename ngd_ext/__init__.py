"""NeuroGaze-Distill: the fused Proto-KD + D-Geo loss, the student's loss as modules, and the code the pipeline
stages share (file formats and their synthetic stand-ins in ngd_ext.data)."""

from ngd_ext import reference
from ngd_ext.augment import augment
from ngd_ext.ops import fused_available, proto_dgeo_loss
from ngd_ext.student_loss import ProtoDGeoLoss, ProtoDGeoTerms, StudentLoss

__all__ = ["ProtoDGeoLoss", "ProtoDGeoTerms", "StudentLoss", "augment", "fused_available", "proto_dgeo_loss",
           "reference"]
