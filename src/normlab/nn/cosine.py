"""Cosine Normalization (Luo et al., 2017): each unit outputs the cosine between its weight and its input.

    plain:     f(x) = w·x / (‖w‖ ‖x‖)
    centered:  f(x) = (w − μ_w)·(x − μ_x) / (‖w − μ_w‖ ‖x − μ_x‖)

For a convolution x is each receptive-field patch — C_in/groups channels × the kernel, taken with the layer's
stride, padding (zeros or ``padding_mode``), dilation and groups. Outputs lie in [−1, 1]; an optional
learnable ``scale`` multiplies them (a softmax over cosines alone is too flat to train a classifier).

No unfolding: the numerator is an ordinary convolution with unit-norm weights ŵ = w/‖w‖, and the patch
norms come from the per-group channel sums Σ_c x² (and Σ_c x when centered) summed over every kernel window
with strided slices. Temporaries are input-sized, the norms output-sized (N, groups, *out): nothing is
kernel-size × input. (Slices rather than a convolution with a ones kernel: they support dilation and never
run in TF32.) Centered patches use ‖x − μ‖² = Σx² − (Σx)²/n, evaluated after subtracting each sample's mean
per group — the centered cosine does not change under a common shift — so that a large common offset
(x = 1e4 + noise) does not cancel away the precision.

Zero vectors: a patch or weight row whose norm is at most ``eps`` — or, centered, lies below the rounding
floor of its own computation, as a constant patch does — counts as zero: its output is 0 and it passes no
gradient. Never NaN.

Norms and sums are computed in float32 at least; the output has the input's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab._checks import check_eps
from normlab.registry import register_norm

__all__ = ["CosineConv1d", "CosineConv2d", "CosineConv3d", "CosineLinear", "cosine_conv", "cosine_linear"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


from normlab.functional.cosine import cosine_conv, cosine_linear  # noqa: E402,F401

# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------


class _CosineScale:
    """The optional output scale shared by the cosine layers (a 0-d parameter, or buffer if not learned)."""

    def _init_cosine(self, centered, scale, learn_scale, eps, factory) -> None:
        who = type(self).__name__
        check_eps(eps, who)
        is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if scale is not None and not (is_number and math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"{who}: scale must be None or a finite number > 0 (its initial value), got {scale!r}"
            )
        self.centered = bool(centered)
        self.eps = eps
        self.init_scale = None if scale is None else float(scale)
        self.learn_scale = bool(learn_scale)
        if scale is None:
            self.register_parameter("scale", None)
        elif learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale), **factory))
        else:
            self.register_buffer("scale", torch.tensor(float(scale), **factory))

    def _reset_scale(self) -> None:
        scale = getattr(self, "scale", None)  # absent while the base class's __init__ runs
        if scale is not None:
            with torch.no_grad():
                scale.fill_(self.init_scale)

    def _cosine_repr(self) -> str:
        text = f"centered={self.centered}"
        if self.init_scale is not None:
            text += f", scale={self.init_scale}, learn_scale={self.learn_scale}"
        return text if self.eps == 1e-8 else f"{text}, eps={self.eps}"


class CosineLinear(_CosineScale, nn.Linear):
    """Cosine-normalized linear layer: y = scale · w·x / (‖w‖ ‖x‖) per output unit (no bias).

    Args:
        in_features, out_features: as nn.Linear.
        centered: subtract the mean of each weight row and of each input vector first (the centered
            variant, a correlation coefficient).
        scale: None for outputs in [−1, 1]; else the initial value of a scalar output scale.
        learn_scale: whether that scale is a parameter (default) or a fixed buffer.
        eps: vectors with norm ≤ eps count as zero (output 0, no gradient).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        centered: bool = False,
        scale: float | None = None,
        learn_scale: bool = True,
        eps: float = 1e-8,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self._init_cosine(centered, scale, learn_scale, eps, {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_scale()

    def forward(self, input: Tensor) -> Tensor:
        return cosine_linear(input, self.weight, centered=self.centered, scale=self.scale, eps=self.eps)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._cosine_repr()}"


class _CosineConvNd(_CosineScale):
    """Cosine-normalized convolution: y = scale · w·x / (‖w‖ ‖x‖) for every receptive-field patch x (no bias).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode: as
            torch.nn.Conv2d; a patch is C_in/groups channels × the kernel.
        centered: subtract the mean of each weight row and of each patch first.
        scale: None for outputs in [−1, 1]; else the initial value of a scalar output scale.
        learn_scale: whether that scale is a parameter (default) or a fixed buffer.
        eps: vectors with norm ≤ eps count as zero (output 0, no gradient).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        *,
        padding_mode: str = "zeros",
        centered: bool = False,
        scale: float | None = None,
        learn_scale: bool = True,
        eps: float = 1e-8,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias=False, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._init_cosine(centered, scale, learn_scale, eps, {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_scale()

    def forward(self, input: Tensor) -> Tensor:
        return cosine_conv(
            input, self.weight, stride=self.stride, padding=self.padding, dilation=self.dilation,
            groups=self.groups, padding_mode=self.padding_mode, centered=self.centered, scale=self.scale,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._cosine_repr()}"


class CosineConv1d(_CosineConvNd, nn.Conv1d):
    __doc__ = _CosineConvNd.__doc__ + "\n    Input (N, C_in, L) or (C_in, L).\n"


class CosineConv2d(_CosineConvNd, nn.Conv2d):
    __doc__ = _CosineConvNd.__doc__ + "\n    Input (N, C_in, H, W) or (C_in, H, W).\n"


class CosineConv3d(_CosineConvNd, nn.Conv3d):
    __doc__ = _CosineConvNd.__doc__ + "\n    Input (N, C_in, D, H, W) or (C_in, D, H, W).\n"


# --------------------------------------------------------------------------------------------------------
# Registry: wrap_layer("cosine", layer)
# --------------------------------------------------------------------------------------------------------

_COSINE_CONVS = {nn.Conv1d: CosineConv1d, nn.Conv2d: CosineConv2d, nn.Conv3d: CosineConv3d}


@register_norm("cosine", "cosine_norm", kind="weight")
def _make_cosine(layer: nn.Module, *, copy_weight: bool = True, **kwargs) -> nn.Module:
    """``wrap_layer("cosine", layer, centered=..., scale=...)``: the cosine layer with ``layer``'s shapes,
    stride, padding, dilation, groups, padding_mode, device and dtype, and (``copy_weight``) its weight.
    Cosine units have no bias: the layer's bias is dropped."""
    if not isinstance(layer, (nn.Linear, *_COSINE_CONVS)):
        raise TypeError(
            f"wrap_layer('cosine', layer) expects nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}"
        )
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"wrap_layer('cosine', layer): {type(layer).__name__} is uninitialized (lazy); run one forward "
            "pass first"
        )
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        new = CosineLinear(layer.in_features, layer.out_features, **kwargs, **factory)
    else:
        cls = next(c for base, c in _COSINE_CONVS.items() if isinstance(layer, base))
        new = cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, padding_mode=layer.padding_mode, **kwargs, **factory,
        )
    if copy_weight:
        with torch.no_grad():
            new.weight.copy_(layer.weight)
    return new
