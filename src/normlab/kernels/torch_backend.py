"""The portable backend: the closed forms of SPEC §1 written in PyTorch tensor operations.

It runs on every device and dtype, and it is differentiable: called with grad mode on (inside a backward
with ``create_graph=True``) its backward builds a graph, which gives double backward for free.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab._stats import count, moments, pool_moments, stats_dtype
from normlab.kernels.contract import NormSpec, SwitchSpec

name = "torch"


def supports(xv: Tensor, spec: NormSpec) -> bool:
    return True


def supports_switch(xv: Tensor, spec: SwitchSpec) -> bool:
    return True


def _affine_reduce(t: Tensor, affine_shape: tuple[int, ...]) -> Tensor:
    """Sum ``t`` over every dim that the broadcast affine parameters do not have."""
    dims = tuple(d for d in range(t.dim()) if affine_shape[d] == 1 and t.shape[d] != 1)
    return t.sum(dims, keepdim=True) if dims else t


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        xhat = xhat * weight.to(xhat.dtype)
    if bias is not None:
        xhat = xhat + bias.to(xhat.dtype)
    return xhat


# ---------------------------------------------------------------- BN, LN, IN, GN

def forward(xv: Tensor, weight, bias, spec: NormSpec, eps: float):
    #   x̂ = (x − μ) / sqrt(σ² + ε),   y = γ x̂ + β     over the dims spec.dims
    mean, var = moments(xv, spec.dims)
    rstd = torch.rsqrt(var + eps)
    xhat = (xv.to(mean.dtype) - mean) * rstd
    return _affine(xhat, weight, bias).to(xv.dtype), mean, rstd, var


def backward(dy: Tensor, xv: Tensor, weight, mean: Tensor, rstd: Tensor, spec: NormSpec, needs):
    #   g = ∂l/∂x̂ = dy·γ;   with S the statistics set and mean_S its mean,
    #   dx = rstd · (g − mean_S(g) − x̂ · mean_S(g·x̂))   (SPEC's three terms, collected)
    #   dγ = Σ dy·x̂,  dβ = Σ dy                        (over everything but the channel)
    # Parameter gradients come back in the statistics dtype; the autograd Function casts them.
    need_dx, need_dweight, need_dbias = needs
    acc = stats_dtype(xv.dtype)
    dyf = dy.to(acc)
    xhat = (xv.to(acc) - mean) * rstd
    dx = dweight = dbias = None
    if need_dweight:
        dweight = _affine_reduce(dyf * xhat, spec.affine_shape)
    if need_dbias:
        dbias = _affine_reduce(dyf, spec.affine_shape)
    if need_dx:
        g = dyf * weight.to(acc) if weight is not None else dyf
        m = count(xv, spec.dims)
        c1 = g.sum(spec.dims, keepdim=True) / m
        c2 = (g * xhat).sum(spec.dims, keepdim=True) / m
        dx = (rstd * (g - c1 - xhat * c2)).to(xv.dtype)
    return dx, dweight, dbias


# ---------------------------------------------------------------- Switchable Norm

def _pool_dims(source: str, spec: SwitchSpec) -> tuple[int, ...]:
    """Dims of the per-(n, c) statistics that source ``source`` averages over."""
    return {"in": (), "ln": (spec.view.group_dim,), "bn": (spec.view.sample_dim,)}[source]


def _positions(xv: Tensor, spec: SwitchSpec) -> int:
    return xv.shape[spec.view.position_dim]


def _in_var_scale(positions: int, spec: SwitchSpec) -> float:
    """s: authors' unbiased IN variance is s · (biased), s = L/(L − 1)."""
    return positions / (positions - 1) if spec.authors_compat and positions > 1 else 1.0


def switch_sources(mean_in, var_in, running_mean, running_var, spec: SwitchSpec, positions: int):
    """Per-source (μ_k, σ²_k, P_k, f_k) from the per-(n, c) moments (SPEC §1, offset-stable form).

    P_k: how many (n, c) cells source k pools; f_k: the authors' unbiased correction P/(P−1) for inputs
    with one position per channel (1.0 otherwise). A running BN source has P_k = 0 (a constant).
    """
    var_in = var_in * _in_var_scale(positions, spec)
    out = []
    for source in spec.sources:
        if source == "bn" and spec.running_bn:
            out.append((running_mean, running_var, 0, 1.0))
            continue
        dims = _pool_dims(source, spec)
        if not dims:
            out.append((mean_in, var_in, 1, 1.0))
            continue
        pooled = mean_in.shape[dims[0]]
        mean_k, var_k = pool_moments(mean_in, var_in, dims)
        f = pooled / (pooled - 1) if spec.authors_compat and positions == 1 and pooled > 1 else 1.0
        out.append((mean_k, var_k * f, pooled, f))
    return out


def switch_mix(mean_in, var_in, running_mean, running_var, mean_logits, var_logits, spec, positions, eps):
    """The mixed per-(n, c) statistics and what the backward needs to differentiate them:
    (sources, w, w_var, mean, rstd) with w = softmax(λ), w_var = softmax(λ'), rstd = 1/sqrt(σ² + ε)."""
    sources = switch_sources(mean_in, var_in, running_mean, running_var, spec, positions)
    w = torch.softmax(mean_logits.to(mean_in.dtype), 0)
    w_var = torch.softmax(var_logits.to(mean_in.dtype), 0)
    mean = sum(w[k] * s[0] for k, s in enumerate(sources))
    rstd = torch.rsqrt(sum(w_var[k] * s[1] for k, s in enumerate(sources)) + eps)
    return sources, w, w_var, mean, rstd


def switch_forward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var, spec, eps):
    #   μ = Σ_k softmax(λ)_k μ_k,   σ² = Σ_k softmax(λ')_k σ²_k,   y = γ (x − μ)/sqrt(σ² + ε) + β
    stat_dims = spec.view.group_dims  # one (n, c) cell: channel-in-group (size 1) and positions
    mean_in, var_in = moments(xv, stat_dims)
    sources, _, _, mean, rstd = switch_mix(
        mean_in, var_in, running_mean, running_var, mean_logits, var_logits, spec, _positions(xv, spec), eps
    )
    xhat = (xv.to(mean.dtype) - mean) * rstd
    batch_mean = batch_var = None
    if "bn" in spec.sources and not spec.running_bn:
        batch_mean, batch_var = sources[spec.sources.index("bn")][:2]
    return _affine(xhat, weight, bias).to(xv.dtype), mean_in, var_in, batch_mean, batch_var


def switch_input_terms(grad_mean, grad_var, mean_in, sources, w, w_var, spec: SwitchSpec, positions: int):
    """Per (n, c) cell, dx = g·r + coef·(x − μ_in) + shift   (see `switch_backward`):

        coef  = Σ_k 2 s f_k w'_k pool_k(Gσ) / (P_k L)
        shift = Σ_k [ w_k pool_k(Gμ) / (P_k L) + 2 f_k w'_k pool_k(Gσ) / (P_k L) · (μ_in − μ_k) ]

    Running statistics (P_k = 0) are constants and add nothing. Returns (coef, shift), None where empty.
    """
    s = _in_var_scale(positions, spec)
    coef = shift = None
    for k, (source, (mean_k, _, pooled, f)) in enumerate(zip(spec.sources, sources, strict=True)):
        if pooled == 0:
            continue
        dims = _pool_dims(source, spec)
        gm = grad_mean.sum(dims, keepdim=True) if dims else grad_mean
        gv = grad_var.sum(dims, keepdim=True) if dims else grad_var
        scale = 1.0 / (pooled * positions)
        var_term = (2 * f * scale) * w_var[k] * gv
        term = w[k] * gm * scale + var_term * (mean_in - mean_k)
        coef = s * var_term if coef is None else coef + s * var_term
        shift = term if shift is None else shift + term
    return coef, shift


def switch_logit_grads(grad_mean, grad_var, sources, w, w_var, needs):
    """dλ = w ⊙ (a − Σ w a), a_k = Σ Gμ μ_k;  dλ' likewise with Gσ and σ²_k  (None where not needed)."""
    need_dmean_logits, need_dvar_logits = needs
    dmean_logits = dvar_logits = None
    if need_dmean_logits:
        a = torch.stack([(grad_mean * s[0]).sum() for s in sources])
        dmean_logits = w * (a - (w * a).sum())
    if need_dvar_logits:
        a = torch.stack([(grad_var * s[1]).sum() for s in sources])
        dvar_logits = w_var * (a - (w_var * a).sum())
    return dmean_logits, dvar_logits


def switch_grads_from_sums(s1, s2, weight, mean_in, sources, w, w_var, rstd, spec: SwitchSpec, positions: int,
                           needs):
    """SN's backward from the per-(n, c) sums of a kernel, S1 = Σ_pos dy and S2 = Σ_pos dy·x̂ ((N, C, 1, 1)):

        Gμ = −r γ S1,   Gσ = −½ r² γ S2,   dγ = Σ_n S2,   dβ = Σ_n S1,   dλ, dλ' (`switch_logit_grads`)
        dx = scale·dy + coef·(x − μ_in) + shift,   scale = γ r   (coef, shift: `switch_input_terms`)

    Returns ((scale, coef, shift) or None when dx is not needed, dweight, dbias, dmean_logits, dvar_logits);
    the backend applies dx with its own elementwise pass."""
    gamma = None if weight is None else weight.to(s1.dtype).reshape(spec.affine_shape)
    gs1, gs2 = (s1, s2) if gamma is None else (s1 * gamma, s2 * gamma)
    grad_mean = -rstd * gs1
    grad_var = -0.5 * rstd.square() * gs2
    dx_terms = dweight = dbias = None
    if needs[0]:
        scale = rstd if gamma is None else rstd * gamma
        dx_terms = (scale, *switch_input_terms(grad_mean, grad_var, mean_in, sources, w, w_var, spec, positions))
    if needs[1]:
        dweight = s2.sum(0, keepdim=True).view(spec.affine_shape)
    if needs[2]:
        dbias = s1.sum(0, keepdim=True).view(spec.affine_shape)
    return (dx_terms, dweight, dbias, *switch_logit_grads(grad_mean, grad_var, sources, w, w_var, needs[3:]))


def switch_backward(dy, xv, weight, mean_logits, var_logits, running_mean, running_var,
                    mean_in, var_in, spec, eps, needs):
    #   g = dy·γ, r = 1/sqrt(σ² + ε), per (n, c) cell:  Gμ = −r Σ_pos g,   Gσ = −½ r² Σ_pos g·x̂
    #   dx = g r + Σ_k [ w_k  pool_k(Gμ) / (P_k L)
    #                  + 2 f_k w'_k pool_k(Gσ) / (P_k L) · (s (x − μ_in) + μ_in − μ_k) ]
    #      = g r + coef · (x − μ_in) + shift                      (`switch_input_terms`)
    #   dλ = w ⊙ (a − Σ w a),  a_k = Σ Gμ μ_k;   dλ' likewise with Gσ and σ²_k
    #   dγ = Σ dy·x̂,  dβ = Σ dy
    need_dx, need_dweight, need_dbias = needs[:3]
    acc = stats_dtype(xv.dtype)
    positions = _positions(xv, spec)
    sources, w, w_var, mean, rstd = switch_mix(
        mean_in, var_in, running_mean, running_var, mean_logits, var_logits, spec, positions, eps
    )
    xf = xv.to(acc)
    dyf = dy.to(acc)
    xhat = (xf - mean) * rstd
    g = dyf * weight.to(acc) if weight is not None else dyf

    cell = spec.view.group_dims
    grad_mean = -rstd * g.sum(cell, keepdim=True)
    grad_var = -0.5 * rstd.square() * (g * xhat).sum(cell, keepdim=True)

    dx = dweight = dbias = None
    if need_dx:
        dx = g * rstd
        coef, shift = switch_input_terms(grad_mean, grad_var, mean_in, sources, w, w_var, spec, positions)
        if coef is not None:
            dx = dx + coef * (xf - mean_in) + shift
        dx = dx.to(xv.dtype)
    if need_dweight:
        dweight = _affine_reduce(dyf * xhat, spec.affine_shape)
    if need_dbias:
        dbias = _affine_reduce(dyf, spec.affine_shape)
    dmean_logits, dvar_logits = switch_logit_grads(grad_mean, grad_var, sources, w, w_var, needs[3:])
    return dx, dweight, dbias, dmean_logits, dvar_logits
