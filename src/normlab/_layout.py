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
from functools import lru_cache

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


@lru_cache(maxsize=1024)
def _view_geometry(shape: tuple[int, ...], channels_last: bool, groups: int) -> tuple[tuple[int, ...], FeatureView]:
    """The 4-d view's shape and its `FeatureView` (cached: the same shapes come back every step)."""
    n, c, positions = shape[0], shape[1], math.prod(shape[2:])
    view_shape = (n, positions, groups, c // groups) if channels_last else (n, groups, c // groups, positions)
    return view_shape, FeatureView(tuple(shape), channels_last)


def to_view(x: Tensor, groups: int) -> tuple[Tensor, FeatureView]:
    """View (N, C, *spatial) as 4-d per the module docstring; copies only for exotic strides."""
    if x.is_contiguous():  # the common case first: a small call costs little more than these lines
        view_shape, view = _view_geometry(x.shape, False, groups)
        return x.view(view_shape), view
    channels_last = is_channels_last(x)
    view_shape, view = _view_geometry(x.shape, channels_last, groups)
    if channels_last:
        return x.movedim(1, -1).reshape(view_shape), view
    return x.contiguous().view(view_shape), view


def from_view(yv: Tensor, view: FeatureView) -> Tensor:
    """Inverse of `to_view`: the input's shape, with channels_last layout kept (``yv`` may have it already)."""
    if tuple(yv.shape) == view.input_shape and not view.channels_last:
        return yv
    if view.channels_last:
        n, c, *spatial = view.input_shape
        return yv.reshape(n, *spatial, c).movedim(-1, 1)
    return yv.reshape(view.input_shape)

