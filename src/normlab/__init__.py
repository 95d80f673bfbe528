"""normlab: normalization methods of deep learning as drop-in PyTorch layers.

Feature normalizations (BN, LN, IN, GN, SN) share one statistics routine and one closed-form backward;
weight-side ones (WN, cosine) reparametrize a layer's weights. `create_norm` builds any of them by name.
"""

from normlab import functional, reference
from normlab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
)
from normlab.registry import create_norm, list_norms, norm_kind, register_norm, wrap_layer

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "create_norm",
    "functional",
    "list_norms",
    "norm_kind",
    "reference",
    "register_norm",
    "wrap_layer",
]
