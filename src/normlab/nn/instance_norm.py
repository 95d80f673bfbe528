"""InstanceNorm1d/2d/3d: drop-ins for torch.nn's, computed by normlab.functional.instance_norm."""

from __future__ import annotations

from torch import Tensor

from normlab import functional as F
from normlab._checks import check_channels, check_dims
from normlab.nn._affine import affine_parameters
from normlab.nn._running_stats import RunningStatsNorm, exponential_average_factor
from normlab.nn.batch_norm import pick_by_dim
from normlab.registry import register_norm


class _InstanceNorm(RunningStatsNorm):
    """Instance Normalization (Ulyanov et al., 2016): statistics per (sample, channel) over positions.

    Defaults follow torch.nn: affine=False, track_running_stats=False. With tracking, training moves the
    running estimates toward the batch average of per-instance statistics (unbiased variance) with
    PyTorch's momentum (weight of the new batch) and eval uses them. Unlike torch.nn, ``momentum=None``
    is a cumulative average here (torch.nn's InstanceNorm silently never updates), and a channel-count
    mismatch is an error even without affine parameters. Unbatched (C, *) inputs are accepted.
    """

    _spatial: int = 0
    _layout: str = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, backend: str = "auto", *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend,
                         bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        who = type(self).__name__
        batched = self._spatial + 2
        check_dims(input, (batched - 1, batched), who, f"{self._layout} or unbatched")
        unbatched = input.dim() == batched - 1
        if unbatched:
            input = input.unsqueeze(0)
        check_channels(input, self.num_features, who)
        factor = exponential_average_factor(self)
        weight, bias = affine_parameters(self)
        out = F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            weight,
            bias,
            self.training or not self.track_running_stats,
            factor,
            self.eps,
            backend=self.backend,
        )
        return out.squeeze(0) if unbatched else out


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__ + "\n    Input (N, C, L) or (C, L).\n"
    _spatial, _layout = 1, "(N, C, L)"


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__ + "\n    Input (N, C, H, W) or (C, H, W).\n"
    _spatial, _layout = 2, "(N, C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__ + "\n    Input (N, C, D, H, W) or (C, D, H, W).\n"
    _spatial, _layout = 3, "(N, C, D, H, W)"


INSTANCE_NORMS = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}


@register_norm("in", "instancenorm", "instance_norm")
def _make_instance_norm(num_channels: int, dim: int = 2, affine: bool = True, **kwargs) -> _InstanceNorm:
    """Instance norm with learnable affine parameters by default (as in the GN/SN papers' comparisons)."""
    return pick_by_dim(INSTANCE_NORMS, dim, "in")(num_channels, affine=affine, **kwargs)
