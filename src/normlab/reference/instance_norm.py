"""Instance Norm reference (NumPy, float64): statistics per (n, c) over S = (*spatial)."""

from normlab.reference import _feature
from normlab.reference._feature import as_f64, channel_view


def forward(x, gamma, beta, eps=1e-5):
    """x: (N, C, *spatial); gamma, beta: (C,) or None. Returns (out, cache);
    cache["mean"], cache["var"] (biased): (N, C). With no spatial dims each set has one value (x̂ = 0)."""
    x, gamma, beta = as_f64(x), as_f64(gamma), as_f64(beta)  # (N, C, *sp), (C,), (C,)
    g_v, b_v = channel_view(gamma, x.ndim), channel_view(beta, x.ndim)  # (1, C, 1, ...)
    axes = tuple(range(2, x.ndim))  # S = (*spatial)
    out, fc = _feature.forward(x, axes, g_v, b_v, eps)  # (N, C, *sp)
    n, c = x.shape[:2]
    return out, {"feature": fc, "mean": fc["mean"].reshape(n, c), "var": fc["var"].reshape(n, c)}


def backward(dout, cache):
    """Gradients {"x": (N, C, *sp), "gamma": (C,), "beta": (C,)} (affine keys only when given)."""
    grads = _feature.backward(as_f64(dout), cache["feature"])
    return _feature.reshape_params(grads, (-1,))
