"""Weight Normalization reference (NumPy, float64), straight from SPEC §1.

    w = g · v / ‖v‖            ‖v‖ over every axis of v but `dim` (over all axes when dim is None)
    ∇g = Σ ∇w · v / ‖v‖        summed over the same axes
    ∇v = (g/‖v‖) ∇w − (g ∇g / ‖v‖²) v

g has v's shape with 1 on every axis but `dim` (torch's `norm_except_dim` layout), or is a scalar when
dim is None. `linear_forward` / `linear_backward` add the layer around it: y = x wᵀ + b.
"""

import numpy as np


def _axes(ndim, dim):
    """The axes the norm runs over: every axis but `dim` (all when dim is None); dim may be negative."""
    if dim is None:
        return tuple(range(ndim))
    dim = dim % ndim
    return tuple(a for a in range(ndim) if a != dim)


def forward(v, g, dim=0):
    """v: (O, ...); g: like v with 1 on the norm axes (a scalar for dim=None). Returns (w, cache)."""
    v = np.array(v, dtype=np.float64)  # (O, ...)
    g = np.array(g, dtype=np.float64)  # (O, 1, ...) or ()
    axes = _axes(v.ndim, dim)
    keep = dim is not None
    norm = np.asarray(np.sqrt(np.sum(v * v, axis=axes, keepdims=keep)))  # like g
    w = g * v / norm  # like v
    return w, {"v": v, "g": g, "norm": norm, "axes": axes, "keep": keep}


def backward(dw, cache):
    """Gradients {"v": like v, "g": like g} from ∂l/∂w (SPEC §1)."""
    v, g, norm, axes, keep = cache["v"], cache["g"], cache["norm"], cache["axes"], cache["keep"]
    dw = np.array(dw, dtype=np.float64)  # like v
    dg = np.asarray(np.sum(dw * v, axis=axes, keepdims=keep) / norm)  # like g
    dv = (g / norm) * dw - (g * dg / norm**2) * v  # like v
    return {"v": dv, "g": dg}


def linear_forward(x, v, g, b=None):
    """y = x wᵀ + b with w = g · v/‖v‖ per output row: x (N, I), v (O, I), g (O, 1), b (O,) or None."""
    w, wcache = forward(v, g, dim=0)  # (O, I)
    x = np.array(x, dtype=np.float64)  # (N, I)
    y = x @ w.T  # (N, O)
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64)  # (N, O)
    return y, {"x": x, "w": w, "wcache": wcache, "has_bias": b is not None}


def linear_backward(dy, cache):
    """Gradients {"x": (N, I), "v": (O, I), "g": (O, 1)} (+ "b": (O,) when the layer has a bias)."""
    dy = np.array(dy, dtype=np.float64)  # (N, O)
    grads = backward(dy.T @ cache["x"], cache["wcache"])  # dw: (O, I)
    grads["x"] = dy @ cache["w"]  # (N, I)
    if cache["has_bias"]:
        grads["b"] = dy.sum(axis=0)  # (O,)
    return grads
