"""Thin modules: parameters, buffers, checks and repr; each forward is one normlab.functional call."""

from normlab.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.nn.group_norm import GroupNorm
from normlab.nn.instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.nn.layer_norm import LayerNorm
from normlab.nn.switch_norm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d

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
]
