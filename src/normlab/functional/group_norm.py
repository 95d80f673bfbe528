"""Group Norm: statistics per (sample, group of C/G channels). LN over (C, *) is G = 1, IN is G = C."""

from __future__ import annotations

from torch import Tensor

from normlab._checks import check_dims, check_eps, check_groups, check_tensor
from normlab.functional._normalize import check_channel_params, feature_call
from normlab.functional._prepared import prepared
from normlab.kernels.contract import group_spec


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """Group Normalization over an (N, C, *) input, like `torch.nn.functional.group_norm`."""
    return prepared(_prepare, input, weight, bias, num_groups, eps, backend)(input, weight, bias, eps)[0]


def _prepare(input, weight, bias, num_groups, eps, backend):
    who = "group_norm"
    check_tensor(input, who)
    check_dims(input, (2, 3, 4, 5), who, "(N, C, *spatial)")
    check_eps(eps, who)
    channels = input.shape[1]
    check_groups(channels, num_groups, who)
    check_channel_params(channels, who, weight=weight, bias=bias)
    return feature_call(input, num_groups, lambda view: group_spec(view, num_groups), backend, statistics=False)
