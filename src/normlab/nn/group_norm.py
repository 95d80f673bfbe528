"""GroupNorm: drop-in for torch.nn's, computed by normlab.functional.group_norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_dims, check_eps, check_groups
from normlab.nn._affine import affine_parameters
from normlab.registry import register_norm


class GroupNorm(nn.Module):
    """Group Normalization (Wu & He, 2018): statistics per (sample, group of C/G channels).

    y = (x − E[x]) / sqrt(Var[x] + eps) · weight + bias, biased variance, per-channel affine. Independent
    of the batch size: train and eval compute the same thing. GroupNorm(1, C) is SPEC's Layer Norm of a
    feature map, GroupNorm(C, C) its Instance Norm. Input (N, C, *).

    Args as torch.nn.GroupNorm: num_groups, num_channels, eps, affine, device, dtype, keyword-only bias;
    ``backend`` picks the kernel ("auto" by default).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, backend: str = "auto", *, bias: bool = True) -> None:
        super().__init__()
        who = type(self).__name__
        check_groups(num_channels, num_groups, who)
        check_eps(eps, who)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        who = type(self).__name__
        check_dims(input, (2, 3, 4, 5), who, "(N, C, *spatial)")
        check_channels(input, self.num_channels, who)
        weight, bias = affine_parameters(self)
        return F.group_norm(input, self.num_groups, weight, bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        text = (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"


@register_norm("gn", "groupnorm", "group_norm")
def _make_group_norm(num_channels: int, dim: int = 2, groups: int = 32, **kwargs) -> GroupNorm:
    """GN with 32 groups by default (the GN paper's choice); ``groups`` must divide the channel count."""
    return GroupNorm(groups, num_channels, **kwargs)


@register_norm("ln", "layernorm", "layer_norm")
def _make_layer_norm(num_channels: int, dim: int = 2, **kwargs) -> GroupNorm:
    """SPEC's LN of a feature map: statistics over (C, *spatial) per sample, per-channel affine = GN(1).
    For torch.nn.LayerNorm's trailing-dims convention use normlab.LayerNorm directly."""
    return GroupNorm(1, num_channels, **kwargs)
