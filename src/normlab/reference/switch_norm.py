"""Switchable Norm reference (NumPy, float64), Luo et al., ICLR 2019 (SPEC §1).

On x viewed as (N, C, L), L = prod(spatial), with k ranging over `sources` (a subset of in/ln/bn):

    μ_in = mean_L x,  σ²_in = Σ_L (x − μ_in)² / d               (N, C)   d = L (L − 1 if unbiased_in_var)
    q_in = σ²_in + μ²_in                                         (N, C)
    μ_ln = mean_C μ_in,  σ²_ln = s_ln · (mean_C q_in − μ²_ln)     (N,)
    μ_bn = mean_N μ_in,  σ²_bn = s_bn · (mean_N q_in − μ²_bn)     (C,)     or given running stats (constants)
    w = softmax(mean_logits),  w' = softmax(var_logits)         (K,)
    μ = Σ_k w_k μ_k,  σ² = Σ_k w'_k σ²_k,  rstd = 1/sqrt(σ² + eps) (N, C)
    y = γ (x − μ) · rstd + β                                    (N, C, L)

s_ln = s_bn = 1, except for input (N, C) without spatial dims and unbiased_in_var: there L = 1, σ²_in = 0,
and s_ln = C/(C − 1), s_bn = N/(N − 1) give the unbiased x.var over C resp. N of the authors' 1d code.
`unbiased_in_var=True` otherwise reproduces the authors' implementation (unbiased σ²_in feeding LN/BN).
"""

import numpy as np

from normlab.reference._feature import affine, affine_backward, as_f64, channel_view, sum_to

SOURCES = ("in", "ln", "bn")
_AXIS = {"ln": 1, "bn": 0}  # the axis of the (N, C, 1) moments that LN resp. BN average over


def _softmax(z):
    e = np.exp(z - z.max())  # (K,)
    return e / e.sum()  # (K,)


def _softmax_backward(w, dw):
    # dλ = w ⊙ (dw − Σ_j w_j dw_j)
    dw = np.asarray(dw, dtype=np.float64)  # (K,)
    return w * (dw - np.dot(w, dw))  # (K,)


def _check(x, sources, mean_logits, var_logits, unbiased_in_var, running_mean, running_var):
    if x.ndim < 2:
        raise ValueError(f"switch_norm: x must be (N, C, *spatial), got shape {x.shape}")
    if not sources or len(set(sources)) != len(sources) or not set(sources) <= set(SOURCES):
        raise ValueError(f"switch_norm: sources must be a non-empty subset of {SOURCES} without repeats, "
                         f"got {sources}")
    k = len(sources)
    if mean_logits.shape != (k,) or var_logits.shape != (k,):
        raise ValueError(f"switch_norm: mean_logits and var_logits need shape ({k},), one per source "
                         f"{sources}; got {mean_logits.shape} and {var_logits.shape}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("switch_norm: give both running_mean and running_var (eval mode) or neither")
    if x.ndim == 2 and "in" in sources:
        raise ValueError("switch_norm: input (N, C) has no spatial dims, so 'in' statistics are undefined; "
                         "use sources=('ln', 'bn') as the authors' SwitchNorm1d does")
    if unbiased_in_var and x.ndim > 2 and np.prod(x.shape[2:]) < 2:
        raise ValueError(f"switch_norm: unbiased_in_var needs more than 1 spatial position, got {x.shape}")
    if unbiased_in_var and x.ndim == 2:
        for src in set(sources) & {"ln", "bn"}:
            if x.shape[_AXIS[src]] < 2 and not (src == "bn" and running_mean is not None):
                raise ValueError(f"switch_norm: the unbiased {src} variance of input {x.shape} needs "
                                 f"more than 1 value")


def forward(x, gamma, beta, mean_logits, var_logits, sources=SOURCES, eps=1e-5, unbiased_in_var=False,
            running_mean=None, running_var=None):
    """x: (N, C, *spatial); gamma, beta: (C,) or None; mean_logits, var_logits: (len(sources),);
    running_mean, running_var: (C,) or None (given: the BN source uses them as constants, eval mode).

    Returns (out, cache). cache["mean"], cache["var"]: (N, C) mixed statistics; cache["mean_<k>"],
    cache["var_<k>"] for each source k: (N, C) for in, (N,) for ln, (C,) for bn (the running stats in eval
    mode); cache["w_mean"], cache["w_var"]: the softmax weights."""
    x, gamma, beta = as_f64(x), as_f64(gamma), as_f64(beta)  # (N, C, *sp), (C,), (C,)
    mean_logits, var_logits = as_f64(mean_logits), as_f64(var_logits)  # (K,), (K,)
    sources = tuple(sources)
    _check(x, sources, mean_logits, var_logits, unbiased_in_var, running_mean, running_var)
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)  # (N, C, L)
    dof = x3.shape[2] - 1 if unbiased_in_var and x.ndim > 2 else x3.shape[2]  # d
    scale = {k: x.shape[ax] / (x.shape[ax] - 1) if unbiased_in_var and x.ndim == 2 and x.shape[ax] > 1
             else 1.0 for k, ax in _AXIS.items()}  # s_ln, s_bn (unused where n_k = 1, see _check)

    mean_in = x3.mean(axis=2, keepdims=True)  # (N, C, 1)
    var_in = ((x3 - mean_in) ** 2).sum(axis=2, keepdims=True) / dof  # (N, C, 1)
    sq_in = var_in + mean_in**2  # (N, C, 1)
    means, varis = {"in": mean_in}, {"in": var_in}
    for k, ax in _AXIS.items():
        means[k] = mean_in.mean(axis=ax, keepdims=True)  # ln: (N, 1, 1), bn: (1, C, 1)
        varis[k] = scale[k] * (sq_in.mean(axis=ax, keepdims=True) - means[k] ** 2)  # same
    frozen_bn = running_mean is not None
    if frozen_bn:
        means["bn"] = as_f64(running_mean).reshape(1, c, 1)  # (1, C, 1)
        varis["bn"] = as_f64(running_var).reshape(1, c, 1)  # (1, C, 1)

    w_mean, w_var = _softmax(mean_logits), _softmax(var_logits)  # (K,), (K,)
    mean = sum(w * means[k] for w, k in zip(w_mean, sources, strict=True)) + np.zeros((n, c, 1))  # (N, C, 1)
    var = sum(w * varis[k] for w, k in zip(w_var, sources, strict=True)) + np.zeros((n, c, 1))  # (N, C, 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (N, C, 1)
    xhat = (x3 - mean) * rstd  # (N, C, L)
    g_v, b_v = channel_view(gamma, 3), channel_view(beta, 3)  # (1, C, 1)
    out = affine(xhat, g_v, b_v).reshape(x.shape)  # (N, C, *sp)

    cache = {"x3": x3, "x_shape": x.shape, "sources": sources, "frozen_bn": frozen_bn, "dof": dof,
             "scale": scale, "means": means, "varis": varis, "mean_all": mean, "rstd": rstd,
             "gamma": g_v, "beta": b_v, "w_mean": w_mean, "w_var": w_var,
             "mean": mean.reshape(n, c), "var": var.reshape(n, c)}
    shapes = {"in": (n, c), "ln": (n,), "bn": (c,)}
    for k in sources:
        cache[f"mean_{k}"] = means[k].reshape(shapes[k])
        cache[f"var_{k}"] = varis[k].reshape(shapes[k])
    return out, cache


def backward(dout, cache):
    """Gradients {"x": (N, C, *sp), "gamma": (C,), "beta": (C,), "mean_logits": (K,), "var_logits": (K,)}
    ("gamma"/"beta" only when given)."""
    x3, means, varis, rstd = cache["x3"], cache["means"], cache["varis"], cache["rstd"]
    sources, scale, w_mean, w_var = cache["sources"], cache["scale"], cache["w_mean"], cache["w_var"]
    mean_in = means["in"]  # (N, C, 1)
    dout3 = as_f64(dout).reshape(x3.shape)  # (N, C, L)
    xhat = (x3 - cache["mean_all"]) * rstd  # (N, C, L)
    g, grads = affine_backward(dout3, xhat, cache["gamma"], cache["beta"])  # g = dout·γ: (N, C, L)
    grads = {k: v.reshape(-1) for k, v in grads.items()}  # (C,)

    # μ, σ² enter y through x̂ = (x − μ)·rstd only:
    #   dmean = −rstd Σ_L g,   dvar = −½ rstd² Σ_L g·x̂
    dmean = -rstd * g.sum(axis=2, keepdims=True)  # (N, C, 1)
    dvar = -0.5 * rstd**2 * (g * xhat).sum(axis=2, keepdims=True)  # (N, C, 1)
    # μ = Σ_k w_k μ_k, w = softmax(mean_logits):  dw_k = Σ dmean·μ_k, then softmax backward (same for var)
    grads["mean_logits"] = _softmax_backward(w_mean, [np.sum(dmean * means[k]) for k in sources])  # (K,)
    grads["var_logits"] = _softmax_backward(w_var, [np.sum(dvar * varis[k]) for k in sources])  # (K,)

    # to the per-(n, c) moments, with dμ_k = w_k Σ dmean and dσ²_k = w'_k Σ dvar over k's broadcast axes,
    # n_k = C for ln, N for bn (bn skipped when frozen: running stats are constants):
    #   gm = ∂l/∂μ_in  = dμ_in  + Σ_{k∈ln,bn} (dμ_k + 2 s_k dσ²_k (μ_in − μ_k)) / n_k
    #   gv = ∂l/∂σ²_in = dσ²_in + Σ_{k∈ln,bn} s_k dσ²_k / n_k
    gm = np.zeros_like(mean_in)  # (N, C, 1)
    gv = np.zeros_like(mean_in)  # (N, C, 1)
    for w, wv, k in zip(w_mean, w_var, sources, strict=True):
        dmu_k = w * sum_to(dmean, means[k].shape)  # like μ_k
        dvar_k = wv * sum_to(dvar, varis[k].shape)  # like σ²_k
        if k == "in":
            gm, gv = gm + dmu_k, gv + dvar_k
        elif not (k == "bn" and cache["frozen_bn"]):
            n_k = x3.shape[_AXIS[k]]
            gm = gm + (dmu_k + 2 * scale[k] * dvar_k * (mean_in - means[k])) / n_k  # (N, C, 1)
            gv = gv + scale[k] * dvar_k / n_k  # (N, C, 1)
    # x -> moments: ∂μ_in/∂x = 1/L, ∂σ²_in/∂x = 2 (x − μ_in)/d;  plus the direct path g·rstd
    dx = g * rstd + gm / x3.shape[2] + gv * 2 * (x3 - mean_in) / cache["dof"]  # (N, C, L)
    grads["x"] = dx.reshape(cache["x_shape"])  # (N, C, *sp)
    return grads
