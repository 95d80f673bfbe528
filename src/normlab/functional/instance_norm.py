"""Instance Norm: statistics per (sample, channel) — Group Norm with G = C."""

from __future__ import annotations

import math

from torch import Tensor

from normlab._layout import from_view, to_view
from normlab.functional._normalize import (
    apply_channel_stats,
    check_running_norm_args,
    normalize,
    update_running,
)
from normlab.kernels.contract import group_spec, variance


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
    who = "instance_norm"
    channels = check_running_norm_args(
        input, who, eps, momentum, ndims=(3, 4, 5),
        weight=weight, bias=bias, running_mean=running_mean, running_var=running_var,
    )
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(
                f"{who}: use_input_stats=False normalizes with running_mean and running_var, got None"
            )
        return apply_channel_stats(input, running_mean, running_var, weight, bias, eps)
    positions = math.prod(input.shape[2:])
    if positions <= 1:
        raise ValueError(
            f"{who}: expected more than 1 spatial element per instance, got input of shape {tuple(input.shape)}"
        )
    xv, view = to_view(input, channels)
    spec = group_spec(view, channels)
    yv, mean, rstd, var = normalize(xv, spec, weight, bias, eps, backend, input)
    if running_mean is not None:
        update_running(running_mean, mean.mean(0), momentum)
    if running_var is not None:
        update_running(running_var, (variance(var, rstd, eps) * (positions / (positions - 1))).mean(0), momentum)
    return from_view(yv, view)
