"""Cosine Normalization reference (NumPy, float64), straight from SPEC §1, by explicit unfolding.

    plain:     y = s · w·x / (‖w‖ ‖x‖)
    centered:  y = s · (w − μ_w)·(x − μ_x) / (‖w − μ_w‖ ‖x − μ_x‖)

for every output unit (weight row w) and every receptive-field patch x: C/groups channels × the kernel,
zero-padded, with stride and dilation. A linear layer is the case with no spatial dims: x (N, C), w (O, C).
A vector (patch or weight row, after centering) with norm ≤ eps counts as zero: its output is 0 and it
passes no gradient.

Backward, per patch with a = 1/‖x_c‖, b = 1/‖w_c‖, p = w_c·x_c, cos = p·a·b (a or b = 0 for a zero vector):

    ∂l/∂cos = s · dout,   ∂l/∂s = Σ dout · cos
    ∂l/∂x_c = b·a Σ_o ∂l/∂cos · w_c − a² (Σ_o ∂l/∂cos · cos) x_c        (the second term: ∂‖x_c‖/∂x_c = a x_c)
    ∂l/∂w_c = b·a Σ_patches ∂l/∂cos · x_c − b² (Σ_patches ∂l/∂cos · cos) w_c
    centered: ∂l/∂x = ∂l/∂x_c − mean(∂l/∂x_c), likewise for w.
"""

import itertools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _tuple(value, nd):
    return (value,) * nd if np.isscalar(value) else tuple(value)


def _unfold(x, kernel, stride, padding, dilation):
    """(N, C, *S) -> patches (N, C, *K, *L): zero padding, then one window per output position."""
    nd = len(kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding])  # (N, C, *(S + 2P))
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    win = sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))  # (N, C, *positions, *extent)
    index = (slice(None),) * 2 + tuple(slice(None, None, s) for s in stride)
    index += tuple(slice(None, None, d) for d in dilation)
    win = win[index]  # (N, C, *L, *K)
    order = (0, 1) + tuple(range(2 + nd, 2 + 2 * nd)) + tuple(range(2, 2 + nd))
    return win.transpose(order), xp.shape  # (N, C, *K, *L)


def _fold(patches, padded_shape, stride, padding, dilation):
    """Adjoint of _unfold: (N, C, *K, *L) -> (N, C, *S), summing overlapping windows."""
    nd = len(stride)
    kernel, out = patches.shape[2 : 2 + nd], patches.shape[2 + nd :]
    dxp = np.zeros(padded_shape)  # (N, C, *(S + 2P))
    for taps in itertools.product(*(range(k) for k in kernel)):
        rows = zip(taps, dilation, stride, out, strict=True)
        index = (slice(None),) * 2 + tuple(slice(t * d, t * d + s * (n - 1) + 1, s) for t, d, s, n in rows)
        dxp[index] += patches[(slice(None), slice(None)) + taps]  # (N, C, *L)
    crop = (slice(None),) * 2 + tuple(slice(p, dxp.shape[2 + i] - p) for i, p in enumerate(padding))
    return dxp[crop]  # (N, C, *S)


def _inv_norm(v, axis, eps):
    """1/‖v‖ along `axis` (kept), 0 where ‖v‖ ≤ eps."""
    norm = np.sqrt(np.sum(v * v, axis=axis, keepdims=True))
    return np.where(norm > eps, 1.0 / np.maximum(norm, eps), 0.0)


def forward(x, w, *, centered=False, stride=1, padding=0, dilation=1, groups=1, scale=1.0, eps=1e-8):
    """x: (N, C, *S) with 0-3 spatial dims; w: (O, C/groups, *K). Returns (out (N, O, *L), cache)."""
    x, w = np.array(x, dtype=np.float64), np.array(w, dtype=np.float64)
    nd = x.ndim - 2
    stride, padding, dilation = _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd)
    n_batch, out_channels = x.shape[0], w.shape[0]
    if nd:
        patches, padded_shape = _unfold(x, w.shape[2:], stride, padding, dilation)  # (N, C, *K, *L)
        out_spatial = patches.shape[2 + nd :]
    else:
        patches, padded_shape, out_spatial = x, x.shape, ()  # (N, C)
    n = w[0].size  # patch length
    cols = patches.reshape(n_batch, groups, n, -1)  # (N, G, n, L)
    rows = w.reshape(groups, out_channels // groups, n)  # (G, Og, n)
    xc = cols - cols.mean(axis=2, keepdims=True) if centered else cols  # (N, G, n, L)
    wc = rows - rows.mean(axis=2, keepdims=True) if centered else rows  # (G, Og, n)
    a = _inv_norm(xc, 2, eps)[:, :, 0, :]  # (N, G, L): 1/‖x_c‖
    b = _inv_norm(wc, 2, eps)[:, :, 0]  # (G, Og): 1/‖w_c‖
    p = np.einsum("gon,Ngnl->Ngol", wc, xc)  # (N, G, Og, L)
    cos = p * b[None, :, :, None] * a[:, :, None, :]  # (N, G, Og, L)
    out = scale * cos.reshape((n_batch, out_channels) + tuple(out_spatial))  # (N, O, *L)
    cache = {
        "xc": xc, "wc": wc, "a": a, "b": b, "cos": cos, "scale": scale, "centered": centered,
        "patch_shape": patches.shape, "padded_shape": padded_shape, "w_shape": w.shape,
        "stride": stride, "padding": padding, "dilation": dilation,
    }
    return out, cache


def backward(dout, cache):
    """Gradients {"x": like x, "w": like w, "scale": scalar}."""
    xc, wc, a, b, cos = cache["xc"], cache["wc"], cache["a"], cache["b"], cache["cos"]
    dout = np.array(dout, dtype=np.float64).reshape(cos.shape)  # (N, G, Og, L)
    dscale = np.sum(dout * cos)  # ()
    dcos = cache["scale"] * dout  # (N, G, Og, L)
    dp = dcos * b[None, :, :, None] * a[:, :, None, :]  # (N, G, Og, L): ∂l/∂p
    dc_cos = dcos * cos  # (N, G, Og, L)
    dxc = np.einsum("gon,Ngol->Ngnl", wc, dp)  # (N, G, n, L)
    dxc -= (a**2 * dc_cos.sum(axis=2))[:, :, None, :] * xc  # (N, G, n, L)
    dwc = np.einsum("Ngnl,Ngol->gon", xc, dp)  # (G, Og, n)
    dwc -= (b**2 * dc_cos.sum(axis=(0, 3)))[:, :, None] * wc  # (G, Og, n)
    if cache["centered"]:
        dxc = dxc - dxc.mean(axis=2, keepdims=True)  # (N, G, n, L)
        dwc = dwc - dwc.mean(axis=2, keepdims=True)  # (G, Og, n)
    dpatches = dxc.reshape(cache["patch_shape"])  # (N, C, *K, *L) or (N, C)
    if len(cache["stride"]):
        dx = _fold(dpatches, cache["padded_shape"], cache["stride"], cache["padding"], cache["dilation"])
    else:
        dx = dpatches  # (N, C)
    return {"x": dx, "w": dwc.reshape(cache["w_shape"]), "scale": dscale}
