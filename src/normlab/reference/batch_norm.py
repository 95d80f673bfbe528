"""Batch Norm reference (NumPy, float64): statistics per channel over S = (N, *spatial).

Training (`forward`) normalizes with the batch's biased variance (÷m) and also reports the unbiased
variance (÷(m − 1)) that PyTorch stores in `running_var`. Inference (`eval_forward`) uses given
running statistics as constants.
"""

import numpy as np

from normlab.reference import _feature
from normlab.reference._feature import as_f64, channel_view


def _axes(ndim):
    return (0,) + tuple(range(2, ndim))  # S = (N, *spatial)


def forward(x, gamma, beta, eps=1e-5):
    """x: (N, C, *spatial); gamma, beta: (C,) or None. Returns (out, cache).

    cache["mean"], cache["var"] (biased), cache["var_unbiased"]: (C,) batch statistics;
    var_unbiased is NaN when a channel has a single value (m = 1)."""
    x, gamma, beta = as_f64(x), as_f64(gamma), as_f64(beta)  # (N, C, *sp), (C,), (C,)
    g_v, b_v = channel_view(gamma, x.ndim), channel_view(beta, x.ndim)  # (1, C, 1, ...)
    out, fc = _feature.forward(x, _axes(x.ndim), g_v, b_v, eps)  # (N, C, *sp)
    m = x.size // x.shape[1]  # values per channel
    var = fc["var"].reshape(-1)  # (C,)
    var_unbiased = var * m / (m - 1) if m > 1 else np.full_like(var, np.nan)  # (C,)
    cache = {"feature": fc, "mean": fc["mean"].reshape(-1), "var": var, "var_unbiased": var_unbiased}
    return out, cache


def eval_forward(x, running_mean, running_var, gamma, beta, eps=1e-5):
    """Inference: y = γ (x − running_mean)/sqrt(running_var + eps) + β; the statistics get no gradient."""
    x, gamma, beta = as_f64(x), as_f64(gamma), as_f64(beta)  # (N, C, *sp), (C,), (C,)
    mean, var = as_f64(running_mean), as_f64(running_var)  # (C,), (C,)
    stats = (channel_view(mean, x.ndim), channel_view(var, x.ndim))  # (1, C, 1, ...) x2
    g_v, b_v = channel_view(gamma, x.ndim), channel_view(beta, x.ndim)  # (1, C, 1, ...)
    out, fc = _feature.forward(x, _axes(x.ndim), g_v, b_v, eps, stats=stats)  # (N, C, *sp)
    return out, {"feature": fc, "mean": mean, "var": var}


def backward(dout, cache):
    """Gradients {"x": (N, C, *sp), "gamma": (C,), "beta": (C,)} (affine keys only when given)."""
    grads = _feature.backward(as_f64(dout), cache["feature"])
    return _feature.reshape_params(grads, (-1,))
