"""The one contract every kernel backend implements, and the specs that describe a call.

Feature norms (BN, LN, IN, GN) reach a backend as a view ``xv`` of the input (see `normlab._layout`) and
the dims of that view that share one statistic:

    forward(xv, weight, bias, spec, eps)              -> (yv, mean, rstd, var)   keepdim, float32+
    backward(dy, xv, weight, mean, rstd, spec, needs) -> (dx, dweight, dbias)

``weight``/``bias`` are already viewed to broadcast against ``xv`` (or None). ``rstd`` = 1/sqrt(σ² + ε), what
the backward takes. ``var`` is the biased (÷m) σ² where the backend computed it anyway, else None: a caller
that needs it (BN/IN running statistics) derives it from rstd with `variance` — so the common case pays
for no extra tensor operations.
``needs`` = (dx, dweight, dbias) booleans. A backward returns None for what is not needed.
A backend may bring its own autograd node: ``bind(xv, spec, statistics=True) -> run`` with
``run(x, weight, bias, eps) -> (y, mean, rstd, var)`` for every call of this geometry, ``x`` the contiguous
tensor that ``xv`` views (y in its shape), weight/bias in their own shapes; with ``statistics=False`` (a caller
that takes y alone: GN, LN) mean, rstd and var may be None. A run bound with statistics also takes
``run(x, weight, bias, eps, running_mean, running_var, momentum)`` (a float momentum) and then updates those
running estimates as `normlab.functional._normalize.update_running_stats` does (BN's and IN's training step in
one call). It does what
`autograd.FeatureNormFunction.apply` does, with the same contract (saved: the input and the statistics; double
backward through the torch backend's closed form). normlab.functional then binds once per geometry and calls
``run`` (the native CPU backend: a node in C++, for the per-call overhead).
A backend may also offer ``forward_routed(xv, weight, bias, spec, eps) -> (forward's outputs, bwd)``, where
``bwd`` is the object whose ``backward`` takes those statistics (another backend when this one handed the call
on, or a variant that skips checks the forward already made); the autograd Function prefers it.

Switchable Norm reaches a backend as the view with G = C plus a `SwitchSpec`:

    switch_forward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var, spec, eps)
        -> (yv, mean_in, var_in, batch_mean, batch_var)
    switch_backward(dy, xv, weight, mean_logits, var_logits, running_mean, running_var,
                    mean_in, var_in, spec, eps, needs)
        -> (dx, dweight, dbias, dmean_logits, dvar_logits)

``mean_in``/``var_in`` are the per-(n, c) moments (biased), the only statistics saved for backward.
A backend that lacks the SN pair is used for the feature norms only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from torch import Tensor

from normlab._layout import FeatureView

SOURCES = ("in", "ln", "bn")


@dataclass(frozen=True)
class NormSpec:
    """A feature-norm call: which dims of the view share statistics, and the view's geometry.

    ``view`` is None for LayerNorm over trailing dims, whose view is simply (rows, normalized elements).
    ``affine_shape`` is the shape weight/bias take to broadcast against the view (None without affine).
    """

    dims: tuple[int, ...]
    affine_shape: tuple[int, ...] | None = None
    view: FeatureView | None = None


# The specs of the norms (cached: a training loop sees the same few geometries at every step)
@lru_cache(maxsize=1024)
def group_spec(view: FeatureView, groups: int) -> NormSpec:
    """GN, LN of a feature map (G = 1), IN (G = C): statistics per (sample, group)."""
    return NormSpec(view.group_dims, view.affine_shape(groups), view)


@lru_cache(maxsize=1024)
def batch_spec(view: FeatureView) -> NormSpec:
    """BN: statistics per channel, on the view with G = C."""
    return NormSpec(view.batch_dims, view.affine_shape(view.input_shape[1]), view)


@lru_cache(maxsize=1024)
def row_spec(width: int) -> NormSpec:
    """LN over trailing dims: statistics per row of the (rows, width) view, elementwise affine."""
    return NormSpec((1,), (1, width))


@dataclass(frozen=True)
class SwitchSpec:
    """A Switchable Norm call on the G = C view.

    sources: which statistics are mixed, in logit order (a subset of ("in", "ln", "bn")).
    running_bn: the BN source uses running statistics (constants), not the batch's.
    authors_compat: the authors' public implementation — unbiased IN variance, from which LN/BN variances
        are derived; for inputs with one position per channel, LN/BN variances are the unbiased ones.
    """

    view: FeatureView
    sources: tuple[str, ...]
    running_bn: bool
    authors_compat: bool
    affine_shape: tuple[int, ...] | None = None


def variance(var: Tensor | None, rstd: Tensor, eps: float) -> Tensor:
    """σ² from a forward's (rstd, var): ``var`` itself, or σ² = 1/rstd² − ε (clamped at 0) when it is None."""
    return var if var is not None else rstd.pow(-2).sub_(eps).clamp_min_(0.0)


class Backend(Protocol):
    name: str

    def supports(self, xv: Tensor, spec: NormSpec) -> bool: ...

    def forward(self, xv, weight, bias, spec: NormSpec, eps: float): ...

    def backward(self, dy, xv, weight, mean, rstd, spec: NormSpec, needs): ...
