"""Thin modules: parameters, buffers, checks and repr; each forward is one normlab.functional call."""

from normlab.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.cosine import CosineConv1d, CosineConv2d, CosineConv3d, CosineLinear
from normlab.nn.group_norm import GroupNorm
from normlab.nn.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layer_norm import LayerNorm
from normlab.nn.mean_only_batch_norm import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d
from normlab.nn.switch_norm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from normlab.nn.weight_norm import (
    WeightNorm,
    is_weight_normed,
    remove_weight_norm,
    weight_norm,
    weight_norm_init_,
)

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
    "WeightNorm",
    "is_weight_normed",
    "remove_weight_norm",
    "weight_norm",
    "weight_norm_init_",
]
