"""Views that turn every channels-first norm into a reduction over fixed dims of a 4-d tensor.

A (N, C, *spatial) input with G channel groups is viewed without copying as

    contiguous (NCHW):   (N, G, C/G, L)      L = prod(spatial)
    channels_last:       (N, L, G, C/G)

so GN/LN/IN reduce over (channels-in-group, positions), BN over (samples, channels-in-group, positions) with
G = C, and the per-channel affine parameters broadcast over the (G, C/G) dims. Any other strided input is
made contiguous first. `from_view` restores the input's shape and memory format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class FeatureView:
    """Where samples, groups, channels-within-group and positions sit in the 4-d view."""

    input_shape: tuple[int, ...]
    channels_last: bool

    @property
    def sample_dim(self) -> int:
        return 0

    @property
    def group_dim(self) -> int:
        return 2 if self.channels_last else 1

    @property
    def channel_dim(self) -> int:
        return 3 if self.channels_last else 2

    @property
    def position_dim(self) -> int:
        return 1 if self.channels_last else 3

    @property
    def group_dims(self) -> tuple[int, ...]:
        """S_i of GN (and of LN = GN(1), IN = GN(C)): one sample, one group."""
        return tuple(sorted((self.channel_dim, self.position_dim)))

    @property
    def batch_dims(self) -> tuple[int, ...]:
        """S_i of BN (view with G = C): one channel across samples and positions."""
        return tuple(sorted((self.sample_dim, self.channel_dim, self.position_dim)))

    def affine_shape(self, groups: int) -> tuple[int, ...]:
        """Shape that per-channel (C,) parameters take to broadcast against the view."""
        channels = self.input_shape[1]
        shape = [1, 1, 1, 1]
        shape[self.group_dim] = groups
        shape[self.channel_dim] = channels // groups
        return tuple(shape)


def is_channels_last(x: Tensor) -> bool:
    """True if the channel dim has the smallest stride (NHWC-like), not merely a trivial shape."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    return x.movedim(1, -1).is_contiguous()


def to_view(x: Tensor, groups: int) -> tuple[Tensor, FeatureView]:
    """View (N, C, *spatial) as 4-d per the module docstring; copies only for exotic strides."""
    n, c, positions = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    channels_last = is_channels_last(x)
    if channels_last:
        xv = x.movedim(1, -1).reshape(n, positions, groups, c // groups)
    else:
        xv = x.contiguous().view(n, groups, c // groups, positions)
    return xv, FeatureView(tuple(x.shape), channels_last)


def from_view(yv: Tensor, view: FeatureView) -> Tensor:
    """Inverse of `to_view`: the input's shape, with channels_last layout kept (``yv`` may have it already)."""
    if tuple(yv.shape) == view.input_shape and not view.channels_last:
        return yv
    if view.channels_last:
        n, c, *spatial = view.input_shape
        return yv.reshape(n, *spatial, c).movedim(-1, 1)
    return yv.reshape(view.input_shape)

