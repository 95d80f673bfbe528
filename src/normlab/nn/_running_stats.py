"""What BN, IN and SN modules share: per-channel affine parameters, running statistics, and PyTorch's
momentum convention (momentum is the weight of the new batch; None means a cumulative average)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab._checks import check_eps, check_momentum
from normlab.kernels import native_backend


def check_num_features(num_features: int, who: str) -> None:
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
        raise ValueError(f"{who}: num_features must be a positive int, got {num_features!r}")


def exponential_average_factor(module: nn.Module) -> float | Tensor:
    """The running-statistics weight of this forward's batch; counts the batch in training.

    With ``momentum=None`` it is 1/k for the k-th batch (a cumulative average), kept as a tensor so that
    torch.compile traces it without a graph break.
    """
    tracked = getattr(module, "num_batches_tracked", None)
    if module.training and module.track_running_stats and tracked is not None:
        if not native_backend.count_batch(tracked):  # (a native step where it applies: see there)
            tracked.add_(1)
        if module.momentum is None:
            return 1.0 / tracked
    return 0.0 if module.momentum is None else module.momentum


class RunningStatsNorm(nn.Module):
    """torch.nn's _NormBase, same attributes and state_dict keys: weight, bias, running_mean, running_var,
    num_batches_tracked."""

    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_num_features(num_features, who)
        check_eps(eps, who)
        check_momentum(momentum, who)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"
