"""The "cpu" backend: every method composed from ATen's fused CPU kernels, about one memory pass each way.

"auto" prefers the native backend (normlab's own kernels, native_backend.py) for CPU tensors; this one runs
what that does not take (float16) and every CPU call when the native kernels cannot be built here.

Normalization is memory-bound, so the cost of a method is the number of full passes over the tensor. On the
CPU, torch's group-norm and layer-norm kernels run at about the speed of a copy, while its batch norm in
training (and instance norm, which torch computes as a batch norm) takes several times longer. This backend
routes each method to the kernels that are fast and numerically stable:

    method (layout)              forward                                     backward
    GN, LN = GN(1), IN = GN(C)   native_group_norm                           native_group_norm_backward;
      (contiguous)                                                           IN: native_batch_norm_backward
                                                                             over the (1, N·C, L) view
    LN over trailing dims        native_layer_norm                           native_layer_norm_backward
    BN (contiguous, float32/64)  native_group_norm with G = C: per-(n, c)    native_batch_norm_backward
                                 moments → per-channel ones (Chan), then
                                 its output rebased in place to BN's
    BN (bf16/fp16, or small)     native_batch_norm (training)                native_batch_norm_backward
    BN (channels_last)           `moments` + one batch_norm (eval) pass      native_batch_norm_backward
    SN (contiguous)              as BN: per-(n, c) moments → mixed, output   one pass for the per-cell Σdy and
                                 rebased in place                            Σdy·x̂, one pass for dx

Inputs of up to `SMALL` (BN) / `SWITCH_SMALL` (SN) elements take the route with the fewest calls: there
per-call overhead, not memory, sets the time.

Numerics. Forward statistics are stable (ATen's row-wise Welford on contiguous data, `moments` for
channels_last BN), but ATen rounds the mean to a few ulps of μ, which rstd amplifies; and ATen's group- and
layer-norm backward sums dy·x and subtracts μ·Σdy, as our SN backward forms dx = A·dy + B·x + D — both
cancel under a large common offset (ATen's batch-norm backward centres x first: BN and IN need no guard).
So a call whose statistics show |μ|/σ > `OFFSET_LIMIT` (x = 1e4 + noise, constant inputs at an offset)
runs the portable torch backend instead, which centres x first.
Other layouts (channels_last GN/IN/LN: ATen's kernels there use E[x²] − E[x]²), devices and dtypes, and
torch.compile tracing are not supported here: "auto" falls back to the torch backend.

Statistics are float32 (float64 for float64 inputs) whatever the input dtype: parameters, means and 1/σ are
passed to ATen in that dtype, which selects its mixed-precision kernels for bfloat16/float16 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab._stats import moments, pool_moments, stats_dtype
from normlab.kernels import torch_backend
from normlab.kernels.contract import NormSpec, SwitchSpec

name = "cpu"

OFFSET_LIMIT = 32.0  # max |μ|·rstd for ATen's statistics and cancelling formulas (float32 error ≲ 1e-5)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Up to these many elements per-call overhead dominates and the fewest calls win (measured on 2 cores):
SMALL = 1 << 16  # BN: ATen's own batch norm (one call) instead of group norm + pooling + rebasing
SWITCH_SMALL = 1 << 14  # SN: the torch backend's formulas
_STATS_EPS = 1e-12  # eps for the internal per-(n, c) moments when the caller's eps is 0 (keeps rstd finite)

_group_norm = torch.native_group_norm
_group_norm_backward = torch.ops.aten.native_group_norm_backward
_layer_norm = torch.native_layer_norm
_layer_norm_backward = torch.ops.aten.native_layer_norm_backward
_batch_norm = torch.native_batch_norm
_batch_norm_backward = torch.ops.aten.native_batch_norm_backward
_batch_norm_out = torch.ops.aten.native_batch_norm.out
_compiling = torch.compiler.is_compiling


# ---------------------------------------------------------------- what runs here

def _usable(xv: Tensor) -> bool:
    return xv.is_cpu and xv.dtype in _DTYPES and xv.numel() > 0 and xv.is_contiguous() and not _compiling()


def _kind(spec: NormSpec) -> str | None:
    """'rows' (LN over trailing dims), 'group' (GN/LN/IN), 'batch' or 'batch_cl' (BN); None: not here.
    A view's group dims are two (channels-in-group, positions), its batch dims three (and samples)."""
    view = spec.view
    if view is None:
        return "rows" if spec.dims == (1,) else None
    if len(spec.dims) == 2:
        return None if view.channels_last else "group"
    return "batch_cl" if view.channels_last else "batch"


def supports(xv: Tensor, spec: NormSpec) -> bool:
    return _usable(xv) and _kind(spec) is not None


def supports_switch(xv: Tensor, spec: SwitchSpec) -> bool:
    return _usable(xv) and not spec.view.channels_last


# ---------------------------------------------------------------- helpers

def _param(p: Tensor | None, acc: torch.dtype) -> Tensor | None:
    """An affine parameter (in its broadcast shape) as the 1-d, statistics-dtype tensor ATen expects."""
    return None if p is None else p.reshape(-1).to(acc)


def _stats_weight(w: Tensor | None, x: Tensor, size: int) -> Tensor | None:
    """ATen computes statistics in float32 for a low-precision input only with a float32 weight: ones."""
    if w is None and x.dtype in (torch.bfloat16, torch.float16):
        return torch.ones(size, dtype=torch.float32)
    return w


def _var(rstd: Tensor, eps: float) -> Tensor:
    """σ² from ATen's rstd = 1/sqrt(σ² + ε)."""
    return rstd.pow(-2).sub_(eps).clamp_min_(0.0)


def _offset(mean: Tensor, rstd: Tensor) -> float:
    """max |μ|/σ over the statistics sets: how much a cancelling formula would lose (same shapes)."""
    return float(torch.linalg.vector_norm(mean * rstd, float("inf")))


def _cell_moments(x3: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, float]:
    """One pass of ATen's group norm with G = C over (N, C, L): (y_in, μ, σ², ε_in) per (n, c) cell, where
    y_in = (x − μ)/sqrt(σ² + ε_in) is the cell-normalized input, for rebasing in place."""
    n, channels, positions = x3.shape
    eps_in = eps if eps > 0 else _STATS_EPS
    weight = _stats_weight(None, x3, channels)
    y_in, mean, rstd = _group_norm(x3, weight, None, n, channels, positions, channels, eps_in)
    return y_in, mean, _var(rstd, eps_in), eps_in


def _cell_affine(x3: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """x·a + b with one (a, b) per (n, c) cell of ``x3`` (N, C, L); a, b broadcast against (N, C, 1).

    One vectorized multiply-add per element: ATen's batch-norm transform over the (1, N·C, L) view, with
    mean 0, variance 1 and ε = 0 so that it computes exactly (x − 0)/sqrt(1 + 0)·a + b. ``out`` may be
    ``x3`` itself (elementwise, so writing over the input is safe)."""
    n, channels, positions = x3.shape
    cells = n * channels
    a = a.expand(n, channels, 1).reshape(cells)
    b = b.expand(n, channels, 1).reshape(cells)
    zeros, ones = torch.zeros(cells, dtype=a.dtype), torch.ones(cells, dtype=a.dtype)
    x = x3.view(1, cells, positions)
    if out is None:
        return torch.batch_norm(x, a, b, zeros, ones, False, 0.0, 0.0, False).view(x3.shape)
    _batch_norm_out(x, a, b, zeros, ones, False, 0.0, 0.0, out=out.view(1, cells, positions),
                    save_mean=a.new_empty(0), save_invstd=a.new_empty(0))
    return out


def _rebase_(y_in: Tensor, rstd_in: Tensor, mean_in: Tensor, mean: Tensor, rstd: Tensor, weight, bias) -> Tensor:
    """In place, per (n, c) cell: y_in = (x − μ_in)·r_in  →  y = γ (x − μ)·r + β = y_in·a + b, with
    a = γ r / r_in and b = γ (μ_in − μ) r + β. y_in is centred, so this is exact to rounding.
    ``y_in`` is (N, C, L); the statistics broadcast against (N, C, 1)."""
    scale = rstd if weight is None else rstd * weight
    shift = (mean_in - mean) * scale
    if bias is not None:
        shift = shift + bias
    return _cell_affine(y_in, scale / rstd_in, shift, out=y_in)


# ---------------------------------------------------------------- BN, LN, IN, GN

def forward(xv: Tensor, weight, bias, spec: NormSpec, eps: float):
    return forward_routed(xv, weight, bias, spec, eps)[0]


def forward_routed(xv: Tensor, weight, bias, spec: NormSpec, eps: float):
    """(forward's outputs, the backend whose ``backward`` takes them): the torch backend when the offset guard
    sent the call there, else `checked` — this backend's backward without a second guard on the same
    statistics (the guard costs a host read of max |μ|·rstd per call). See the contract."""
    acc = stats_dtype(xv.dtype)
    w, b = _param(weight, acc), _param(bias, acc)
    yv, mean, rstd, var = _FORWARD[_kind(spec)](xv, spec, w, b, eps)
    if _offset(mean, rstd) > OFFSET_LIMIT:  # a large offset: ATen's mean is off by ulps of μ, times rstd
        return torch_backend.forward(xv, weight, bias, spec, eps), torch_backend
    return (yv, mean, rstd, var), checked


def _rows_forward(xv: Tensor, spec: NormSpec, w, b, eps: float):
    rows, width = xv.shape
    y, mean, rstd = _layer_norm(xv, (width,), _stats_weight(w, xv, width), b, eps)
    return y, mean, rstd, None


def _group_forward(xv: Tensor, spec: NormSpec, w, b, eps: float):
    n, groups, per_group, positions = xv.shape
    channels = groups * per_group
    x3 = xv.view(n, channels, positions)
    y, mean, rstd = _group_norm(x3, _stats_weight(w, xv, channels), b, n, channels, positions, groups, eps)
    shape = (n, groups, 1, 1)
    return y.view(xv.shape), mean.view(shape), rstd.view(shape), None


def _batch_forward(xv: Tensor, spec: NormSpec, w, b, eps: float):
    # per-(n, c) moments in one pass, pooled over n:  μ = mean_n μ_nc,  σ² = mean_n (σ²_nc + (μ_nc − μ)²)
    n, channels, _, positions = xv.shape
    x3 = xv.view(n, channels, positions)
    if xv.numel() <= SMALL or xv.dtype != torch.float32 and xv.dtype != torch.float64:
        # ATen's own batch norm: one call (small inputs), and its reduced-precision kernel is fast
        y, mean, rstd = _batch_norm(x3, _stats_weight(w, xv, channels), b, None, None, True, 0.0, eps)
        return y.view(xv.shape), mean.view(1, channels, 1, 1), rstd.view(1, channels, 1, 1), None
    y, mean_nc, var_nc, eps_in = _cell_moments(x3, eps)
    mean, var = pool_moments(mean_nc, var_nc, (0,))  # (1, C)
    rstd = torch.rsqrt(var + eps)
    wv = None if w is None else w.view(1, channels, 1)
    bv = None if b is None else b.view(1, channels, 1)
    y = _rebase_(y, torch.rsqrt(var_nc + eps_in).unsqueeze(-1), mean_nc.unsqueeze(-1), mean.unsqueeze(-1),
                 rstd.unsqueeze(-1), wv, bv)
    shape = (1, channels, 1, 1)
    return y.view(xv.shape), mean.view(shape), rstd.view(shape), var.view(shape)


def _as_channels_last(t: Tensor) -> Tensor:
    """(N, L, C, 1) view of channels_last memory → the (N, C, L, 1) channels_last tensor ATen expects."""
    return t.permute(0, 2, 1, 3)


def _batch_forward_cl(xv: Tensor, spec: NormSpec, w, b, eps: float):
    channels = xv.shape[2]
    mean, var = moments(xv, spec.dims)  # (1, 1, C, 1), corrected two-pass
    y4 = torch.batch_norm(_as_channels_last(xv), w, b, mean.view(channels), var.view(channels), False, 0.0, eps,
                          False)
    return y4.permute(0, 2, 1, 3).reshape(xv.shape), mean, torch.rsqrt(var + eps), var


_FORWARD = {"rows": _rows_forward, "group": _group_forward, "batch": _batch_forward, "batch_cl": _batch_forward_cl}


def backward(dy: Tensor, xv: Tensor, weight, mean: Tensor, rstd: Tensor, spec: NormSpec, needs, *,
             offset_checked: bool = False):
    """``offset_checked``: these statistics passed `forward`'s offset guard (so the guard is not repeated)."""
    kind = _kind(spec)
    if kind == "group" and xv.shape[2] == 1:
        kind = "instance"  # G = C: each (n, c) cell is a "channel" of ATen's batch-norm backward (faster)
    need_dx, need_dweight, need_dbias = needs
    mask = [need_dx, need_dweight, need_dbias]
    acc = stats_dtype(xv.dtype)
    w = _param(weight, acc)
    dy = dy.contiguous()
    if kind in ("rows", "group") and not offset_checked and _offset(mean, rstd) > OFFSET_LIMIT:  # see the docstring
        return torch_backend.backward(dy, xv, weight, mean, rstd, spec, needs)
    if kind == "rows":
        rows, width = xv.shape
        beta = torch.empty(width, dtype=acc) if need_dbias else None  # only its presence matters
        dx, dw, db = _layer_norm_backward(dy, xv, (width,), mean, rstd, _stats_weight(w, xv, width), beta, mask)
    elif kind == "group":
        n, groups, per_group, positions = xv.shape
        channels = groups * per_group
        dx, dw, db = _group_norm_backward(
            dy.view(n, channels, positions), xv.view(n, channels, positions), mean.view(n, groups),
            rstd.view(n, groups), _stats_weight(w, xv, channels), n, channels, positions, groups, mask,
        )
    elif kind == "instance":
        n, channels, _, positions = xv.shape
        cells = n * channels
        dx, dw, db = _batch_norm_backward(
            dy.view(1, cells, positions), xv.view(1, cells, positions), None if w is None else w.repeat(n),
            None, None, mean.reshape(cells), rstd.reshape(cells), True, 0.0, mask,
        )
        dw = None if dw is None else dw.view(n, channels).sum(0)  # Σ over samples of each cell's Σ dy·x̂
        db = None if db is None else db.view(n, channels).sum(0)
    else:
        channels = mean.numel()
        if kind == "batch":
            x_, dy_ = xv.flatten(2), dy.flatten(2)  # (N, C, L)
        else:
            x_, dy_ = _as_channels_last(xv), _as_channels_last(dy)
        dx, dw, db = _batch_norm_backward(
            dy_, x_, w, None, None, mean.view(channels), rstd.view(channels), True, 0.0, mask
        )
        if dx is not None and kind == "batch_cl":
            dx = dx.permute(0, 2, 1, 3)
    shape = spec.affine_shape
    return (
        None if dx is None else dx.reshape(xv.shape),
        None if dw is None else dw.view(shape),
        None if db is None else db.view(shape),
    )


class _Checked:
    """The backward for statistics that passed `forward`'s offset guard (what `forward_routed` hands out)."""

    name = name

    @staticmethod
    def backward(dy, xv, weight, mean, rstd, spec, needs):
        return backward(dy, xv, weight, mean, rstd, spec, needs, offset_checked=True)


checked = _Checked()


# ---------------------------------------------------------------- Switchable Norm

def switch_forward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var, spec, eps):
    #   per-(n, c) moments in one pass (y_in = cell-normalized x), then as the torch backend:
    #   μ = Σ_k softmax(λ)_k μ_k,  σ² = Σ_k softmax(λ')_k σ²_k;  y = γ (x − μ)/sqrt(σ² + ε) + β, rebased from y_in
    if xv.numel() <= SWITCH_SMALL:
        return torch_backend.switch_forward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var,
                                            spec, eps)
    n, channels, _, positions = xv.shape
    y, mean_nc, var_nc, eps_in = _cell_moments(xv.view(n, channels, positions), eps)
    mean_in, var_in = mean_nc.view(n, channels, 1, 1), var_nc.view(n, channels, 1, 1)
    sources, _, _, mean, rstd = torch_backend.switch_mix(
        mean_in, var_in, running_mean, running_var, mean_logits, var_logits, spec, positions, eps
    )
    if _offset(mean, rstd) > OFFSET_LIMIT:  # see `forward`
        return torch_backend.switch_forward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var,
                                            spec, eps)
    mean, rstd = mean.expand(n, channels, 1, 1), rstd.expand(n, channels, 1, 1)  # mixes may broadcast
    acc = mean_in.dtype
    w, b = _param(weight, acc), _param(bias, acc)
    if xv.dtype == acc:
        cell = (n, channels, 1)
        y = _rebase_(
            y, torch.rsqrt(var_in + eps_in).view(cell), mean_in.view(cell), mean.reshape(cell), rstd.reshape(cell),
            None if w is None else w.view(1, channels, 1), None if b is None else b.view(1, channels, 1),
        )
    else:  # low precision: normalize x directly (one rounding), each (n, c) cell a "channel" of batch_norm
        cells = n * channels
        cell_var = (rstd.pow(-2) - eps).reshape(cells)  # so that batch_norm's 1/sqrt(var + ε) is r
        y = torch.batch_norm(
            xv.view(1, cells, positions), None if w is None else w.repeat(n), None if b is None else b.repeat(n),
            mean.reshape(cells), cell_var, False, 0.0, eps, False,
        )
    batch_mean = batch_var = None
    if "bn" in spec.sources and not spec.running_bn:
        batch_mean, batch_var = sources[spec.sources.index("bn")][:2]
    return y.view(xv.shape), mean_in, var_in, batch_mean, batch_var


def switch_backward(dy, xv, weight, mean_logits, var_logits, running_mean, running_var,
                    mean_in, var_in, spec, eps, needs):
    #   per (n, c) cell, with g = dy·γ and x̂ = (x − μ)·r (mixed statistics):
    #       S1 = Σ_pos dy,  S2 = Σ_pos dy·x̂            one pass (ATen's batch-norm backward reductions)
    #       Gμ = −r γ S1,   Gσ = −½ r² γ S2
    #       dx = γ r · dy + coef·(x − μ_in) + shift   coef, shift: torch_backend.switch_input_terms; one
    #                                                 allocating pass (coef·x + ·) and one in place (+ γ r·dy)
    #   dγ = Σ_n S2,  dβ = Σ_n S1
    if xv.numel() <= SWITCH_SMALL or _offset(mean_in, torch.rsqrt(var_in + eps)) > OFFSET_LIMIT:
        return torch_backend.switch_backward(dy, xv, weight, mean_logits, var_logits, running_mean, running_var,
                                             mean_in, var_in, spec, eps, needs)
    n, channels, _, positions = xv.shape
    cells = n * channels
    acc = mean_in.dtype
    sources, w, w_var, mean, rstd = torch_backend.switch_mix(
        mean_in, var_in, running_mean, running_var, mean_logits, var_logits, spec, positions, eps
    )
    mean, rstd = mean.expand(n, channels, 1, 1), rstd.expand(n, channels, 1, 1)  # mixes may broadcast
    x3, dy3 = xv.view(1, cells, positions), dy.contiguous().view(1, cells, positions)
    _, s2, s1 = _batch_norm_backward(
        dy3, x3, torch.ones(cells, dtype=acc), None, None, mean.reshape(cells), rstd.reshape(cells), True, 0.0,
        [False, True, True],
    )
    dx_terms, dweight, dbias, dmean_logits, dvar_logits = torch_backend.switch_grads_from_sums(
        s1.view(n, channels, 1, 1), s2.view(n, channels, 1, 1), weight, mean_in, sources, w, w_var, rstd, spec,
        positions, needs,
    )
    dx = None
    if dx_terms is not None:
        scale, coef, shift = dx_terms
        dy_ = dy3.view(n, channels, positions)
        scale = scale.expand(n, channels, 1, 1).reshape(n, channels, 1)
        if coef is None:
            dx = dy_ * scale
        else:  # dx = coef·x + (shift − coef·μ_in) + scale·dy   (coefficients per (n, c) cell)
            coef, shift = coef.expand(n, channels, 1, 1), shift.expand(n, channels, 1, 1)
            offset = (shift - coef * mean_in).reshape(n, channels, 1)
            coef = coef.reshape(n, channels, 1)
            x_ = xv.view(n, channels, positions)
            if xv.dtype == acc:
                dx = _cell_affine(x_, coef, offset)
            else:  # low precision: accumulate in float32, round once
                dx = torch.addcmul(offset, x_, coef)
            dx.addcmul_(dy_, scale)
        dx = dx.to(xv.dtype).view(xv.shape)
    return dx, dweight, dbias, dmean_logits, dvar_logits
