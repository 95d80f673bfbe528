"""The one statistics routine: every feature norm's mean and variance comes from here.

A method only picks the set S_i of elements that share statistics (SPEC §1) — in normlab that set is a
tuple of dims of a view of the input (see `_layout`). Statistics are accumulated in float32 at least
(float64 stays float64) whatever the input dtype, and use the corrected two-pass algorithm so that a large
common offset (x = 1e4 + noise) does not cancel catastrophically as the naive E[x²] − E[x]² does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stats_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32, or float64 if any of ``dtypes`` is float64."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (÷m) of ``x`` over ``dims``, keepdim, in `stats_dtype`.

    Corrected two-pass (Chan, Golub & LeVeque): with a first estimate m0 = mean(x) and d = x − m0,
        mean = m0 + mean(d),   var = mean(d²) − mean(d)²
    The correction mean(d) removes the rounding error of m0; var is clamped at 0 for constant inputs.
    """
    xs = x.to(stats_dtype(x.dtype))
    first = xs.mean(dims, keepdim=True)
    centered = xs - first
    correction = centered.mean(dims, keepdim=True)
    var = centered.square().mean(dims, keepdim=True) - correction.square()
    return first + correction, var.clamp_min(0.0)


def pool_moments(mean: Tensor, var: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Moments of the union of equally sized sets, from each set's mean and variance.

        μ = mean_k μ_k,   σ² = mean_k (σ²_k + (μ_k − μ)²)

    This is SPEC's σ²_ln = mean_c(σ²_in + μ²_in) − μ²_ln rewritten so it does not cancel under an offset.
    """
    pooled_mean = mean.mean(dims, keepdim=True)
    pooled_var = (var + (mean - pooled_mean).square()).mean(dims, keepdim=True)
    return pooled_mean, pooled_var


def count(x: Tensor, dims: tuple[int, ...]) -> int:
    """m = |S_i|: how many elements share one statistic."""
    m = 1
    for d in dims:
        m *= x.shape[d]
    return m
