"""Layer Norm reference (NumPy, float64), `torch.nn.LayerNorm` semantics: statistics over the last
`normalized_ndim` dims; γ, β elementwise with shape x.shape[-normalized_ndim:].

SPEC's LN (per sample, over (C, *spatial)) is normalized_ndim = x.ndim − 1 with elementwise γ, β;
the per-channel-affine variant is group_norm with groups = 1.
"""

from normlab.reference import _feature
from normlab.reference._feature import as_f64


def forward(x, gamma, beta, normalized_ndim, eps=1e-5):
    """x: any shape; gamma, beta: x.shape[-normalized_ndim:] or None. Returns (out, cache);
    cache["mean"], cache["var"] (biased): x.shape[:-normalized_ndim]."""
    x, gamma, beta = as_f64(x), as_f64(gamma), as_f64(beta)  # (*lead, *norm), (*norm,), (*norm,)
    k = normalized_ndim
    if not 1 <= k <= x.ndim:
        raise ValueError(f"layer_norm: normalized_ndim must be in [1, x.ndim={x.ndim}], got {k}")
    norm_shape = x.shape[x.ndim - k:]  # (*norm,)
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None and p.shape != norm_shape:
            raise ValueError(f"layer_norm: {name} must have shape x.shape[-{k}:] = {norm_shape}, "
                             f"got {p.shape}")
    axes = tuple(range(x.ndim - k, x.ndim))  # S = the last k dims
    out, fc = _feature.forward(x, axes, gamma, beta, eps)  # x.shape
    lead = x.shape[:x.ndim - k]  # (*lead,)
    cache = {"feature": fc, "norm_shape": norm_shape,
             "mean": fc["mean"].reshape(lead), "var": fc["var"].reshape(lead)}
    return out, cache


def backward(dout, cache):
    """Gradients {"x": x.shape, "gamma": (*norm,), "beta": (*norm,)} (affine keys only when given)."""
    grads = _feature.backward(as_f64(dout), cache["feature"])
    return _feature.reshape_params(grads, cache["norm_shape"])
