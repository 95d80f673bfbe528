"""Batch Norm: statistics per channel over (N, *spatial)."""

from __future__ import annotations

from torch import Tensor

from normlab._checks import check_batch_values
from normlab._layout import from_view, to_view
from normlab.functional._normalize import (
    apply_channel_stats,
    check_running_norm_args,
    normalize,
    update_running,
)
from normlab.kernels.contract import batch_spec, variance


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """Batch Normalization over an (N, C, *) input, like `torch.nn.functional.batch_norm`.

    Training normalizes with the batch's biased variance and, if given, updates the running estimates in
    place with the unbiased one: running ← (1 − momentum)·running + momentum·batch (PyTorch's momentum).
    Eval (``training=False``) normalizes with the running estimates.
    """
    who = "batch_norm"
    channels = check_running_norm_args(
        input, who, eps, momentum, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                f"{who}: eval mode (training=False) normalizes with running_mean and running_var, got None; "
                "pass them, or training=True to use the batch's statistics"
            )
        return apply_channel_stats(input, running_mean, running_var, weight, bias, eps)
    per_channel = input.numel() // channels if channels else 0
    check_batch_values(input, per_channel, who)

    xv, view = to_view(input, channels)
    spec = batch_spec(view)
    yv, mean, rstd, var = normalize(xv, spec, weight, bias, eps, backend, input)
    update_running(running_mean, mean, momentum)
    if running_var is not None:
        update_running(running_var, variance(var, rstd, eps) * (per_channel / (per_channel - 1)), momentum)
    return from_view(yv, view)
