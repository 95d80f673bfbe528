"""BatchNorm1d/2d/3d: drop-ins for torch.nn's, computed by normlab.functional.batch_norm."""

from __future__ import annotations

from torch import Tensor

from normlab import functional as F
from normlab._checks import check_channels, check_dims
from normlab.nn._affine import affine_parameters
from normlab.nn._running_stats import RunningStatsNorm, exponential_average_factor
from normlab.registry import register_norm


class _BatchNorm(RunningStatsNorm):
    """Batch Normalization (Ioffe & Szegedy, 2015) over channels-first input.

    y = (x − E[x]) / sqrt(Var[x] + eps) · weight + bias, statistics per channel over the batch and the
    spatial positions. Training normalizes with the batch's biased variance and updates running estimates
    with the unbiased one; eval normalizes with the running estimates, so one sample can be served alone.

    ``momentum`` is PyTorch's, not an optimizer's: running ← (1 − momentum)·running + momentum·batch.
    ``momentum=None`` keeps a cumulative average. Other libraries use the opposite (decay) convention.

    Args: num_features (C), eps, momentum, affine, track_running_stats, device, dtype, keyword-only bias
    as in torch.nn; ``backend`` ("auto", "torch", or a registered fast backend) picks the kernel.
    """

    _input_dims: tuple[int, ...] = ()
    _layout: str = ""

    def forward(self, input: Tensor) -> Tensor:
        who = type(self).__name__
        check_dims(input, self._input_dims, who, self._layout)
        check_channels(input, self.num_features, who)
        factor = exponential_average_factor(self)
        running_mean, running_var = self.running_mean, self.running_var  # (each module attribute costs ~1 µs)
        weight, bias = affine_parameters(self)
        batch_stats = self.training or (running_mean is None and running_var is None)
        use_running = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            running_mean if use_running else None,
            running_var if use_running else None,
            weight,
            bias,
            batch_stats,
            factor,
            self.eps,
            backend=self.backend,
        )


class BatchNorm1d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__ + "\n    Input (N, C) or (N, C, L).\n"
    _input_dims, _layout = (2, 3), "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__ + "\n    Input (N, C, H, W).\n"
    _input_dims, _layout = (4,), "(N, C, H, W)"


class BatchNorm3d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__ + "\n    Input (N, C, D, H, W).\n"
    _input_dims, _layout = (5,), "(N, C, D, H, W)"


BATCH_NORMS = {0: BatchNorm1d, 1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def pick_by_dim(classes: dict, dim: int, name: str):
    if dim not in classes:
        raise ValueError(f"{name}: dim (spatial dims of the input) must be one of {sorted(classes)}, got {dim!r}")
    return classes[dim]


@register_norm("bn", "batchnorm", "batch_norm")
def _make_batch_norm(num_channels: int, dim: int = 2, **kwargs) -> _BatchNorm:
    return pick_by_dim(BATCH_NORMS, dim, "bn")(num_channels, **kwargs)
