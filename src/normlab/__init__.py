"""normlab: normalization methods of deep learning as drop-in PyTorch layers.

Feature normalizations (BN, LN, IN, GN, SN) share one statistics routine and one closed-form backward;
weight-side ones (WN, cosine) reparametrize a layer's weights. `create_norm` builds any of them by name.
"""

from normlab import distributed, functional, reference
from normlab.convert import (
    convert,
    convert_sync_batchnorm,
    freeze_bn,
    revert_sync_batchnorm,
    unfreeze_bn,
)
from normlab.distributed import SyncBatchNorm, SyncSwitchNorm
from normlab.fold import fold_bn
from normlab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    CosineConv1d,
    CosineConv2d,
    CosineConv3d,
    CosineLinear,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    remove_weight_norm,
    weight_norm,
    weight_norm_init_,
)
from normlab.registry import create_norm, list_norms, norm_kind, register_norm, wrap_layer

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CosineConv1d",
    "CosineConv2d",
    "CosineConv3d",
    "CosineLinear",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
    "MeanOnlyBatchNorm3d",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SyncBatchNorm",
    "SyncSwitchNorm",
    "convert",
    "convert_sync_batchnorm",
    "create_norm",
    "distributed",
    "fold_bn",
    "freeze_bn",
    "functional",
    "list_norms",
    "norm_kind",
    "reference",
    "register_norm",
    "remove_weight_norm",
    "revert_sync_batchnorm",
    "unfreeze_bn",
    "weight_norm",
    "weight_norm_init_",
    "wrap_layer",
]
