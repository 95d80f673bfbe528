"""SPEC §1's one formula over a reduction set S, shared by the BN/LN/IN/GN references.

    μ = mean_S(x),  σ² = mean_S((x − μ)²)  (biased, ÷m),  rstd = 1/sqrt(σ² + eps)
    x̂ = (x − μ) · rstd,  y = γ x̂ + β

A method only picks S (the `axes`). Statistics keep the reduced axes (size 1) so they broadcast
against x. With `stats=(mean, var)` the statistics are given constants instead (BN eval mode).
"""

import numpy as np


def as_f64(a):
    """A float64 copy of `a` (None stays None); a copy, so no cache aliases a caller's array."""
    return None if a is None else np.array(a, dtype=np.float64)


def channel_view(p, ndim):
    """(C,) -> (1, C, 1, ..., 1) with `ndim` dims: a per-channel array broadcast over (N, C, *spatial)."""
    return None if p is None else p.reshape((1, -1) + (1,) * (ndim - 2))


def sum_to(a, shape):
    """Sum `a` down to `shape` (which broadcasts to a.shape): the gradient of a broadcast."""
    a = a.sum(axis=tuple(range(a.ndim - len(shape))))  # drop leading broadcast dims
    axes = tuple(i for i, t in enumerate(shape) if t == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True)  # shape


def reshape_params(grads, shape):
    """Reshape the "gamma"/"beta" gradients (computed in their broadcast view) back to `shape`."""
    for key in ("gamma", "beta"):
        if key in grads:
            grads[key] = grads[key].reshape(shape)
    return grads


def affine(xhat, gamma, beta):
    """y = γ x̂ + β, each factor skipped when None (γ, β broadcastable to x̂)."""
    out = xhat if gamma is None else xhat * gamma  # x.shape
    return out if beta is None else out + beta  # x.shape


def affine_backward(dout, xhat, gamma, beta):
    """Returns (g, grads): g = ∂l/∂x̂ = dout·γ, grads["gamma"] = Σ dout·x̂, grads["beta"] = Σ dout."""
    grads = {}
    if gamma is not None:
        grads["gamma"] = sum_to(dout * xhat, gamma.shape)  # gamma.shape
    if beta is not None:
        grads["beta"] = sum_to(dout, beta.shape)  # beta.shape
    g = dout if gamma is None else dout * gamma  # x.shape
    return g, grads


def forward(x, axes, gamma=None, beta=None, eps=1e-5, stats=None):
    """x: float64, any shape; axes: the set S; gamma, beta: broadcastable to x or None;
    stats: None (batch statistics) or (mean, var) constants broadcastable to x."""
    if stats is None:
        mean = x.mean(axis=axes, keepdims=True)  # x.shape with S axes -> 1
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)  # same, biased (÷m)
    else:
        mean, var = stats  # broadcastable to x
    rstd = 1.0 / np.sqrt(var + eps)  # like mean
    xhat = (x - mean) * rstd  # x.shape
    out = affine(xhat, gamma, beta)  # x.shape
    cache = {"x": x, "axes": axes, "mean": mean, "var": var, "rstd": rstd,
             "gamma": gamma, "beta": beta, "constant_stats": stats is not None}
    return out, cache


def backward(dout, cache):
    """Closed form of SPEC §1; needs only x, μ and rstd (x̂ is recomputed). Keys "x" (+ "gamma", "beta")."""
    x, axes, mean, rstd = cache["x"], cache["axes"], cache["mean"], cache["rstd"]
    xhat = (x - mean) * rstd  # x.shape
    g, grads = affine_backward(dout, xhat, cache["gamma"], cache["beta"])  # g: x.shape
    if cache["constant_stats"]:
        # μ, σ² constants: dx = rstd · g
        grads["x"] = rstd * g  # x.shape
        return grads
    # dx = rstd · (g − mean_S(g) − x̂ · mean_S(g · x̂))
    mean_g = g.mean(axis=axes, keepdims=True)  # like mean
    mean_gx = (g * xhat).mean(axis=axes, keepdims=True)  # like mean
    grads["x"] = rstd * (g - mean_g - xhat * mean_gx)  # x.shape
    return grads
