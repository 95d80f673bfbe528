"""Batch Norm: statistics per channel over (N, *spatial)."""

from __future__ import annotations

from torch import Tensor

from normlab._checks import check_batch_values
from normlab.functional._normalize import (
    apply_channel_stats,
    check_running_norm_args,
    feature_call,
    normalize_tracking,
)
from normlab.kernels.contract import batch_spec

WHO = "batch_norm"


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
    if training:
        return normalize_tracking(_prepare, input, weight, bias, running_mean, running_var, momentum, eps, backend)
    _check(input, weight, bias, running_mean, running_var, momentum, eps)
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{WHO}: eval mode (training=False) normalizes with running_mean and running_var, got None; "
            "pass them, or training=True to use the batch's statistics"
        )
    return apply_channel_stats(input, running_mean, running_var, weight, bias, eps)


def _check(input, weight, bias, running_mean, running_var, momentum, eps) -> int:
    return check_running_norm_args(
        input, WHO, eps, momentum, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )


def _prepare(input, weight, bias, running_mean, running_var, momentum, eps, backend):
    """Checks and binding of a training call (statistics of the batch)."""
    channels = _check(input, weight, bias, running_mean, running_var, momentum, eps)
    check_batch_values(input, input.numel() // channels if channels else 0, WHO)
    return feature_call(input, channels, batch_spec, backend)
