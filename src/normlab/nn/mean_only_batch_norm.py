"""Mean-only batch normalization (Salimans & Kingma, 2016, §4): Weight Normalization's companion.

    y = x − μ_B + β        μ_B: the per-channel mean over the batch and spatial positions

No division by a standard deviation — weight normalization already controls the scale — so the added
noise is the batch mean's alone, gentler than BN's. Inference subtracts a running mean instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab._checks import check_batch_values, check_channels, check_dims, check_momentum, check_tensor
from normlab.functional.mean_only_batch_norm import mean_only_batch_norm
from normlab.nn._running_stats import check_num_features, exponential_average_factor
from normlab.nn.batch_norm import pick_by_dim
from normlab.registry import register_norm

__all__ = ["MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d"]


class _MeanOnlyBatchNorm(nn.Module):
    """Mean-only batch normalization: y = x − E[x] + bias, per channel over the batch and spatial positions.

    Training subtracts the batch mean and updates ``running_mean``; eval subtracts ``running_mean`` (or the
    batch mean when ``track_running_stats=False``). There is no variance and no scale: pair it with weight
    normalization, which sets the scale (Salimans & Kingma, 2016).

    ``momentum`` is PyTorch's, not an optimizer's: running ← (1 − momentum)·running + momentum·batch
    (default 0.1). ``momentum=None`` keeps a cumulative average over the batches seen. Other libraries use
    the opposite (decay) convention.

    Args:
        num_features: C, the channel count (dim 1 of the input).
        momentum: see above.
        affine: learn a per-channel bias β (initialized to 0).
        track_running_stats: keep ``running_mean`` and ``num_batches_tracked`` buffers.
        device, dtype: of the bias and the buffers. Batch means are accumulated in float32 at least.
    """

    _input_dims: tuple[int, ...] = ()
    _layout: str = ""

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_num_features(num_features, who)
        check_momentum(momentum, who)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        who = type(self).__name__
        check_tensor(input, who)
        check_dims(input, self._input_dims, who, self._layout)
        check_channels(input, self.num_features, who)
        if self.training:
            check_batch_values(input, input.numel() // input.shape[1], who)
        momentum = exponential_average_factor(self)
        use_batch = self.training or not self.track_running_stats
        return mean_only_batch_norm(
            input,
            self.running_mean if self.track_running_stats else None,
            self.bias,
            training=use_batch,
            momentum=momentum,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class MeanOnlyBatchNorm1d(_MeanOnlyBatchNorm):
    __doc__ = _MeanOnlyBatchNorm.__doc__ + "\n    Input (N, C) or (N, C, L).\n"
    _input_dims, _layout = (2, 3), "(N, C) or (N, C, L)"


class MeanOnlyBatchNorm2d(_MeanOnlyBatchNorm):
    __doc__ = _MeanOnlyBatchNorm.__doc__ + "\n    Input (N, C, H, W).\n"
    _input_dims, _layout = (4,), "(N, C, H, W)"


class MeanOnlyBatchNorm3d(_MeanOnlyBatchNorm):
    __doc__ = _MeanOnlyBatchNorm.__doc__ + "\n    Input (N, C, D, H, W).\n"
    _input_dims, _layout = (5,), "(N, C, D, H, W)"


_BY_DIM = {0: MeanOnlyBatchNorm1d, 1: MeanOnlyBatchNorm1d, 2: MeanOnlyBatchNorm2d, 3: MeanOnlyBatchNorm3d}


@register_norm("mobn", "mean_only_bn")
def _make_mean_only_batch_norm(num_channels: int, dim: int = 2, **kwargs) -> _MeanOnlyBatchNorm:
    return pick_by_dim(_BY_DIM, dim, "mobn")(num_channels, **kwargs)
