"""Layer Norm over trailing dims (torch.nn.LayerNorm's convention: elementwise affine over those dims)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from normlab._checks import check_eps, check_tensor
from normlab._layout import is_channels_last
from normlab.functional._normalize import bind, normalize
from normlab.functional._prepared import prepared
from normlab.kernels.contract import Backend, NormSpec, row_spec


def normalized_shape_tuple(normalized_shape, who: str) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(
            f"{who}: normalized_shape must be a positive int or a non-empty tuple of them, got {normalized_shape!r}"
        )
    return shape


def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """Layer Normalization over the last ``len(normalized_shape)`` dims, like
    `torch.nn.functional.layer_norm`. For SPEC's LN of a (N, C, *) feature map with a per-channel affine,
    use ``group_norm(x, 1, ...)``."""
    return prepared(_prepare, input, weight, bias, normalized_shape, eps, backend)(input, weight, bias, eps)[0]


def _prepare(input, weight, bias, normalized_shape, eps, backend):
    who = "layer_norm"
    check_tensor(input, who)
    check_eps(eps, who)
    shape = normalized_shape_tuple(normalized_shape, who)
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"{who}: expected input with shape (*, {', '.join(map(str, shape))}) for normalized_shape={shape}, "
            f"got input of shape {tuple(input.shape)}"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != shape:
            raise ValueError(f"{who}: {name} must have shape {shape}, got {tuple(param.shape)}")
    width = math.prod(shape)
    spec = row_spec(width)
    return bind(input, input.reshape(-1, width), spec, backend, lambda chosen: RowsCall(len(shape), spec, chosen),
                statistics=False)


class RowsCall(NamedTuple):
    """The general run of a layer norm geometry (see `normlab.functional._normalize.bind`): rows of the
    normalized elements, normalized, in the input's shape and layout."""

    normalized_ndim: int
    spec: NormSpec
    backend: Backend

    def __call__(self, input, weight, bias, eps):
        width = self.spec.affine_shape[1]
        if is_channels_last(input) and self.normalized_ndim == input.dim() - 1:
            # over (C, *spatial) of a channels_last input: rows in memory order (N, *spatial, C), no copy of x;
            # the elementwise affine parameters are permuted the same way (small copies)
            moved = input.movedim(1, -1)
            weight, bias = (p.movedim(0, -1) if p is not None else None for p in (weight, bias))
            yv, mean, rstd, var = normalize(moved.reshape(-1, width), self.spec, weight, bias, eps, self.backend)
            return yv.reshape(moved.shape).movedim(-1, 1), mean, rstd, var
        yv, mean, rstd, var = normalize(input.reshape(-1, width), self.spec, weight, bias, eps, self.backend)
        out = yv.reshape(input.shape)
        if is_channels_last(input) and input.dim() in (4, 5):
            fmt = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
            out = out.contiguous(memory_format=fmt)
        return out, mean, rstd, var
