"""Cross-process statistics: the two collectives the synchronized norms make, one packed tensor each.

    forward:   gather_moments  — ONE all-gather of (count, mean, M2) per process, combined by Chan's formula
    backward:  all_reduce_sum  — ONE all-reduce of the per-channel gradient sums, packed by the caller

Both take the process group (None: the default group) and work with gloo on the CPU and NCCL on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group=None) -> int:
    """Processes in ``group`` (None: the default group); 1 when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def empty_moments(xv: Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Keepdim zeros standing for the moments of an empty set (a process with an empty shard)."""
    shape = [1 if d in dims else s for d, s in enumerate(xv.shape)]
    zeros = torch.zeros(shape, dtype=dtype, device=xv.device)
    return zeros, zeros.clone()


def gather_moments(count: int, mean: Tensor, var: Tensor, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """Moments of the union of every process's set, from each process's ``count``, mean and biased var.

    One all-gather of a packed float64 tensor per process  # 1 + C + C -> (2C + 1)
    then Chan, Golub & LeVeque's formula for combining sets of sizes n_r:

        n = Σ n_r,   μ = Σ (n_r / n) μ_r,   σ² = (1/n) Σ [n_r σ²_r + n_r (μ_r − μ)²]

    Exact for unequal sizes, an empty set (n_r = 0, μ_r = σ²_r = 0) adds nothing, and every term is centered,
    so a large common offset does not cancel (the naive Σx² − (Σx)²/n would). This is `_stats.pool_moments`
    for sets of unequal sizes; float64 keeps counts exact and the combination free of rounding.

    Returns (n, μ, σ²): μ, σ² shaped and typed like ``mean``, n a 0-d float64 tensor, the same on every
    process. Nothing here syncs the host with the device, so torch.compile traces it whole.
    """
    channels = mean.numel()
    local = torch.cat(
        [
            torch.full((1,), float(count), dtype=torch.float64, device=mean.device),
            mean.reshape(-1).double(),
            (var.reshape(-1).double() * count),
        ]
    )
    gathered = local.new_empty(group_size(group) * local.numel())  # flat: what every backend accepts
    _all_gather_single(gathered, local, group)
    counts, means, m2 = gathered.view(-1, local.numel()).split([1, channels, channels], dim=1)  # (P,1|C|C)
    total = counts.sum()
    combined_mean = (counts * means).sum(0) / total.clamp_min(1.0)
    combined_m2 = (m2 + counts * (means - combined_mean).square()).sum(0)
    combined_var = combined_m2 / total.clamp_min(1.0)
    shape, dtype = mean.shape, mean.dtype
    return total, combined_mean.to(dtype).reshape(shape), combined_var.to(dtype).reshape(shape)


def all_reduce_sum(packed: Tensor, group=None) -> Tensor:
    """Sum ``packed`` over the processes of ``group``, in place; returns it."""
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed


def _all_gather_single(out: Tensor, local: Tensor, group) -> None:
    # all_gather_single is torch >= 2.10's name for all_gather_into_tensor (now deprecated).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)
