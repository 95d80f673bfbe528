"""Input checks shared by the functional core and the modules. Messages state what was expected,
what was received, and where useful the likely fix."""

from __future__ import annotations

import math

from torch import Tensor


def check_tensor(x: object, who: str) -> None:
    """A floating-point tensor (any floating dtype; statistics are computed in float32 or better)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{who} expects a floating-point input (float16, bfloat16, float32 or float64), got {x.dtype}; "
            "convert it first, e.g. x.float()"
        )


def check_dims(x: Tensor, allowed: tuple[int, ...], who: str, layout: str) -> None:
    """A floating-point tensor (`check_tensor`) whose number of dimensions is among ``allowed``; ``layout``
    names them, e.g. '(N, C, H, W)'."""
    check_tensor(x, who)  # modules check dims first: a non-tensor must not fail with an AttributeError
    if x.dim() not in allowed:
        want = " or ".join(f"{d}D" for d in allowed)
        raise ValueError(f"{who} expects {want} input {layout}, got {x.dim()}D input of shape {tuple(x.shape)}")


def check_channels(x: Tensor, expected: int, who: str, dim: int = 1) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{who} was built for {expected} channels but got input of shape {tuple(x.shape)} "
            f"with {x.shape[dim]} channels in dim {dim}"
        )


def check_groups(num_channels: int, num_groups: int, who: str) -> None:
    if num_groups <= 0 or num_channels <= 0:
        raise ValueError(f"{who}: num_groups and num_channels must be positive, got {num_groups} and {num_channels}")
    if num_channels % num_groups:
        divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ValueError(
            f"{who}: num_channels must be divisible by num_groups, got {num_channels} channels and "
            f"{num_groups} groups; divisors of {num_channels}: {divisors}"
        )


def check_eps(eps: float, who: str) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{who}: eps must be a finite number >= 0, got {eps!r}")


def check_momentum(momentum: float | None, who: str) -> None:
    """PyTorch convention: the weight of the new batch in [0, 1]; None means a cumulative average."""
    if momentum is None:
        return
    if (
        not isinstance(momentum, (int, float))
        or isinstance(momentum, bool)
        or not math.isfinite(momentum)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(
            f"{who}: momentum must be a finite number in [0, 1] (PyTorch convention: the weight of the new "
            f"batch; None for a cumulative average), got {momentum!r}"
        )


def check_batch_values(x: Tensor, per_channel: int, who: str, hint: str = "") -> None:
    """Batch statistics need more than one value per channel in training."""
    if per_channel <= 1:
        raise ValueError(
            f"{who}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}{hint}"
        )
