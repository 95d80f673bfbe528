"""Mean-only batch normalization (Salimans & Kingma, 2016, §4): Weight Normalization's companion.

    y = x − μ_B + β        μ_B: the per-channel mean over the batch and spatial positions
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional._normalize import update_running


def mean_only_batch_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = False,
    momentum: float | Tensor = 0.1,
) -> Tensor:
    """y = x − μ + bias for channels-first input (N, C, *spatial).

    μ is the batch mean per channel (over N and the spatial positions) when ``training`` or when
    ``running_mean`` is None, else ``running_mean``. In training a given ``running_mean`` is updated in
    place: running ← (1 − momentum)·running + momentum·μ_B — PyTorch's convention, momentum is the weight of
    the new batch. The mean is accumulated in float32 at least; the output has the input's dtype.
    """
    cdt = torch.promote_types(input.dtype, torch.float32)
    x = input.to(cdt)  # (N, C, *S)
    stat_shape = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    if training or running_mean is None:
        # Subtract one sample's value per channel first (exact for nearby floats; y does not change), so a
        # large common offset (x = 1e4 + noise) does not round the mean to the offset's precision.
        shift = x.detach()[(0, slice(None)) + (0,) * (input.dim() - 2)].reshape(stat_shape)  # (1, C, 1...)
        x = x - shift  # (N, C, *S)
        axes = (0,) + tuple(range(2, input.dim()))
        mean = x.mean(dim=axes)  # (C,): batch mean − shift
        if training:
            update_running(running_mean, mean.detach() + shift.reshape(-1), momentum)
    else:
        mean = running_mean.to(cdt)  # (C,)
    y = x - mean.reshape(stat_shape)  # (N, C, *S)
    if bias is not None:
        y = y + bias.to(cdt).reshape(stat_shape)
    return y.to(input.dtype)
