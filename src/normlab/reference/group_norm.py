"""Group Norm reference (NumPy, float64): statistics per (n, group) over S = (C/G channels, *spatial).

Computed as SPEC's one formula on x viewed as (N, G, C/G, *spatial); γ, β stay per channel.
G = 1 is Layer Norm over (C, *spatial); G = C is Instance Norm.
"""

from normlab.reference import _feature
from normlab.reference._feature import as_f64


def forward(x, gamma, beta, groups, eps=1e-5):
    """x: (N, C, *spatial); gamma, beta: (C,) or None; C % groups == 0. Returns (out, cache);
    cache["mean"], cache["var"] (biased): (N, groups)."""
    x, gamma, beta = as_f64(x), as_f64(gamma), as_f64(beta)  # (N, C, *sp), (C,), (C,)
    n, c, *spatial = x.shape
    if groups < 1 or c % groups != 0:
        raise ValueError(f"group_norm: channels C={c} must be divisible by groups, got groups={groups}; "
                         f"pick a divisor of {c}")
    grouped = (n, groups, c // groups, *spatial)  # (N, G, C/G, *sp)
    view = (1, groups, c // groups) + (1,) * len(spatial)  # (1, G, C/G, 1, ...)
    g_v = None if gamma is None else gamma.reshape(view)  # (1, G, C/G, 1, ...)
    b_v = None if beta is None else beta.reshape(view)  # (1, G, C/G, 1, ...)
    axes = tuple(range(2, len(grouped)))  # S = (C/G, *spatial)
    out, fc = _feature.forward(x.reshape(grouped), axes, g_v, b_v, eps)  # (N, G, C/G, *sp)
    cache = {"feature": fc, "x_shape": x.shape,
             "mean": fc["mean"].reshape(n, groups), "var": fc["var"].reshape(n, groups)}
    return out.reshape(x.shape), cache  # (N, C, *sp)


def backward(dout, cache):
    """Gradients {"x": (N, C, *sp), "gamma": (C,), "beta": (C,)} (affine keys only when given)."""
    fc = cache["feature"]
    grads = _feature.backward(as_f64(dout).reshape(fc["x"].shape), fc)  # in (N, G, C/G, *sp)
    grads["x"] = grads["x"].reshape(cache["x_shape"])  # (N, C, *sp)
    return _feature.reshape_params(grads, (-1,))
