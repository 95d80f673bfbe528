"""Switchable Norm on Triton: per-(n, c) moments once, mixed into IN/LN/BN statistics, then one apply.

Only the passes over the input run as kernels (the shared stages of `triton_feature`, view with G = C);
everything between them works on (N, C)-sized statistics with torch ops and mirrors
`torch_backend.switch_forward`/`switch_backward` term by term, so the two backends agree to rounding.

    forward:   moments per (n, c, chunk) → combine per (n, c): μ_in, σ²_in → sources and softmax mix (torch)
               → apply with the mixed per-(n, c) μ and rstd                         reads x twice
    backward:  Σ dy, Σ dy·x̂ per (n, c) → Gμ, Gσ and dx coefficients per (n, c) (torch) → dx
               with dx = rstd·γ·dy + ca + cb·(x − μ):  cb = Σ_k 2 f_k w'_k pool_k(Gσ) s / (P_k L),
               ca = Σ_k [w_k pool_k(Gμ) / (P_k L) + 2 f_k w'_k pool_k(Gσ) (s(μ − μ_in) + μ_in − μ_k) / (P_k L)]
               (torch_backend's formula with s(x − μ_in) = s(x − μ) + s(μ − μ_in))
"""

from __future__ import annotations

import torch

from normlab.kernels import triton_feature as stages
from normlab.kernels.torch_backend import switch_sources
from normlab.kernels.triton_feature import Cells


def _geometry(xv: torch.Tensor, view):
    """Cells of the G = C view and the keepdim shape of per-(n, c) statistics."""
    cells = Cells(xv.shape[0], xv.shape[view.group_dim], xv.shape[view.position_dim], view.channels_last)
    stat_shape = [1] * xv.dim()
    stat_shape[view.sample_dim] = cells.n
    stat_shape[view.group_dim] = cells.c
    return cells, tuple(stat_shape)


def _mixed(mean_logits, var_logits, sources, stat_shape):
    """Softmax weights and the mixed μ, σ² per (n, c) (contiguous float32)."""
    w = torch.softmax(mean_logits.float(), 0)
    w_var = torch.softmax(var_logits.float(), 0)
    mean = sum(w[k] * s[0] for k, s in enumerate(sources))
    var = sum(w_var[k] * s[1] for k, s in enumerate(sources))
    return w, w_var, mean.expand(stat_shape).contiguous(), var.expand(stat_shape).contiguous()


def forward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var, spec, eps: float):
    cells, stat_shape = _geometry(xv, spec.view)
    partials = stages.moment_partials(xv, cells)
    # eps = 1 only keeps the unused rstd finite for constant cells
    mean_in, var_in, _ = stages.combine_moments(partials, cells.n * cells.c, partials[0].shape[-1], eps=1.0)
    mean_in, var_in = mean_in.view(stat_shape), var_in.view(stat_shape)
    sources = switch_sources(mean_in, var_in, running_mean, running_var, spec, cells.positions)
    _, _, mean, var = _mixed(mean_logits, var_logits, sources, stat_shape)
    rstd = torch.rsqrt(var + eps)
    y = torch.empty_like(xv)
    stages.apply(xv, y, mean, rstd, weight, bias, cells, cells.c, 1, 0)  # set of cell (n, c) = n·C + c
    batch_mean = batch_var = None
    if "bn" in spec.sources and not spec.running_bn:
        batch_mean, batch_var = sources[spec.sources.index("bn")][:2]
    return y, mean_in, var_in, batch_mean, batch_var


def backward(dy, xv, weight, mean_logits, var_logits, running_mean, running_var, mean_in, var_in, spec,
             eps: float, needs):
    #   per cell: Σ g = γ Σ dy,  Σ g·x̂ = γ Σ dy·x̂;  Gμ = −rstd Σ g,  Gσ = −½ rstd² Σ g·x̂
    #   dλ = w ⊙ (a − Σ w a),  a_k = Σ Gμ μ_k;  dλ' likewise with Gσ and σ²_k;  dγ = Σ_n Σ dy·x̂,  dβ = Σ_n Σ dy
    need_dx, need_dweight, need_dbias, need_dmean_logits, need_dvar_logits = needs
    view = spec.view
    cells, stat_shape = _geometry(xv, view)
    positions = cells.positions
    sources = switch_sources(mean_in, var_in, running_mean, running_var, spec, positions)
    w, w_var, mean, var = _mixed(mean_logits, var_logits, sources, stat_shape)
    rstd = torch.rsqrt(var + eps)
    sums = stages.grad_partials(dy, xv, mean, rstd, weight, None, cells, cells.c, 1, 0).sum(-1)
    sum_dy, sum_dyx = sums[0].view(stat_shape), sums[1].view(stat_shape)
    gamma = weight.float().view((1,) + stat_shape[1:]) if weight is not None else 1.0  # per channel
    grad_mean = -rstd * gamma * sum_dy
    grad_var = -0.5 * rstd.square() * gamma * sum_dyx

    dx = dweight = dbias = dmean_logits = dvar_logits = None
    if need_dx:
        s = positions / (positions - 1) if spec.authors_compat and positions > 1 else 1.0
        ca = torch.zeros(stat_shape, device=xv.device, dtype=torch.float32)
        cb = torch.zeros_like(ca)
        pool_dims = {"in": (), "ln": (view.group_dim,), "bn": (view.sample_dim,)}
        for k, (source, (mean_k, _, pooled, f)) in enumerate(zip(spec.sources, sources, strict=True)):
            if pooled == 0:  # running statistics: constants
                continue
            dims = pool_dims[source]
            gm = grad_mean.sum(dims, keepdim=True) if dims else grad_mean
            gv = grad_var.sum(dims, keepdim=True) if dims else grad_var
            scale = 1.0 / (pooled * positions)
            coef = (2 * f * scale) * w_var[k] * gv
            ca = ca + w[k] * gm * scale + coef * (s * (mean - mean_in) + mean_in - mean_k)
            cb = cb + coef * s
        ca, cb = ca.expand(stat_shape).contiguous(), cb.expand(stat_shape).contiguous()
        dx = stages.grad_input(dy, xv, mean, rstd, ca, cb, weight, None, cells, cells.c, 1, 0)
    if need_dweight:
        dweight = sum_dyx.sum(view.sample_dim, keepdim=True)
    if need_dbias:
        dbias = sum_dy.sum(view.sample_dim, keepdim=True)
    if need_dmean_logits:
        a = torch.stack([(grad_mean * src[0]).sum() for src in sources])
        dmean_logits = w * (a - (w * a).sum())
    if need_dvar_logits:
        a = torch.stack([(grad_var * src[1]).sum() for src in sources])
        dvar_logits = w_var * (a - (w_var * a).sum())
    return dx, dweight, dbias, dmean_logits, dvar_logits
