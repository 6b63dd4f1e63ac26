"""NeuroGaze-Distill: code shared by the pipeline stages, and the fused Proto-KD + D-Geo loss."""

from ngd_ext import reference
from ngd_ext.ops import fused_available, proto_dgeo_loss

__all__ = ["fused_available", "proto_dgeo_loss", "reference"]
