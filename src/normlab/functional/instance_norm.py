"""Instance Norm: statistics per (sample, channel) — Group Norm with G = C."""

from __future__ import annotations

import math

from torch import Tensor

from normlab.functional._normalize import (
    apply_channel_stats,
    check_running_norm_args,
    feature_call,
    normalize_tracking,
)
from normlab.kernels.contract import group_spec

WHO = "instance_norm"


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """Instance Normalization over an (N, C, *) input, like `torch.nn.functional.instance_norm`.

    With ``use_input_stats`` each (n, c) is normalized by its own biased statistics and the running
    estimates (if given) move toward their batch averages — the mean of the per-instance means and of the
    per-instance unbiased variances — with PyTorch's momentum. Otherwise the running estimates are used.
    """
    if use_input_stats:
        return normalize_tracking(_prepare, input, weight, bias, running_mean, running_var, momentum, eps, backend)
    _check(input, weight, bias, running_mean, running_var, momentum, eps)
    if running_mean is None or running_var is None:
        raise ValueError(f"{WHO}: use_input_stats=False normalizes with running_mean and running_var, got None")
    return apply_channel_stats(input, running_mean, running_var, weight, bias, eps)


def _check(input, weight, bias, running_mean, running_var, momentum, eps) -> int:
    return check_running_norm_args(
        input, WHO, eps, momentum, ndims=(3, 4, 5),
        weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
    )


def _prepare(input, weight, bias, running_mean, running_var, momentum, eps, backend):
    """Checks and binding of a call with the instances' own statistics."""
    channels = _check(input, weight, bias, running_mean, running_var, momentum, eps)
    if math.prod(input.shape[2:]) <= 1:
        raise ValueError(
            f"{WHO}: expected more than 1 spatial element per instance, got input of shape {tuple(input.shape)}"
        )
    return feature_call(input, channels, lambda view: group_spec(view, channels), backend)
