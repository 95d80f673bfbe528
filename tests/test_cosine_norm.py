"""Cosine Normalization: CosineLinear / CosineConv1d-3d against the NumPy reference (forward and every
gradient), the reference against an independent unfold + autograd formula, gradcheck, bounds, zero vectors,
a large common offset, memory (no unfolded input), dtypes and layouts, the registry, and clear errors."""

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from normlab.nn.cosine import (
    CosineConv1d,
    CosineConv2d,
    CosineConv3d,
    CosineLinear,
    cosine_conv,
    cosine_linear,
)
from normlab.reference import cosine_norm as ref
from normlab.registry import norm_kind, wrap_layer

# Tolerances (rtol = atol) on cosines, which are O(1):
# - float64 vs the reference: the same formula in double precision (ours via convolutions), a few ulps.
# - float32 vs the float64 reference on the float32-rounded input: ~1e-7 of rounding per sum, amplified
#   at most a few times by the division; 1e-5 leaves room but still catches any formula slip.
# - float16 / bfloat16 vs the float32 result: sums run in float32, the output is rounded once to the input
#   dtype: 2^-11 (float16) or 2^-8 (bfloat16) relative of values ≤ 1, plus the rounded input itself.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


def close(actual, expected, dtype, msg=None):
    tol = TOL[dtype]
    torch.testing.assert_close(
        torch.as_tensor(actual), torch.as_tensor(expected), rtol=tol, atol=tol, check_dtype=False, msg=msg
    )


def randn(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# (input shape, weight shape, conv kwargs, why)
CONV_CASES = [
    ((2, 3, 9), (4, 3, 3), {}, "1d, no padding"),
    ((2, 4, 9), (6, 2, 3), {"stride": 2, "padding": 1, "groups": 2}, "1d grouped + strided + padded"),
    ((2, 3, 7, 6), (4, 3, 3, 3), {"padding": 1}, "2d, zero padding: border patches hold zeros"),
    ((2, 3, 8, 8), (5, 3, 3, 2), {"stride": (2, 1), "dilation": (1, 2)}, "2d non-square kernel, dilated"),
    ((1, 6, 6, 6), (6, 1, 3, 3), {"padding": 2, "groups": 6, "dilation": 2}, "2d depthwise (C/groups = 1)"),
    ((2, 2, 5, 5, 4), (3, 2, 2, 3, 2), {"padding": (1, 0, 1)}, "3d, per-axis padding"),
    ((2, 3, 5, 5), (4, 3, 1, 1), {}, "1x1 kernel: cosine per pixel across channels"),
]


def _ref_kwargs(kw):
    return {k: kw[k] for k in ("stride", "padding", "dilation", "groups") if k in kw}


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("xs,ws,kw,why", CONV_CASES, ids=[c[3] for c in CONV_CASES])
def test_conv_matches_reference_forward_and_backward(xs, ws, kw, why, centered):
    x = randn(*xs, seed=1).requires_grad_()
    w = randn(*ws, seed=2).requires_grad_()
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    y = cosine_conv(x, w, centered=centered, scale=scale, **kw)
    dy = randn(*y.shape, seed=3)
    y.backward(dy)
    y_ref, cache = ref.forward(
        x.detach().numpy(), w.detach().numpy(), centered=centered, scale=2.5, **_ref_kwargs(kw)
    )
    grads = ref.backward(dy.numpy(), cache)
    close(y.detach(), y_ref, torch.float64)
    close(x.grad, grads["x"], torch.float64)
    close(w.grad, grads["w"], torch.float64)
    close(scale.grad, grads["scale"], torch.float64)


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_module_matches_reference(centered, dtype):
    layer = CosineConv2d(4, 6, 3, stride=2, padding=1, groups=2, centered=centered, dtype=dtype)
    x = randn(2, 4, 9, 9, seed=4, dtype=dtype)
    y_ref, _ = ref.forward(x.double().numpy(), layer.weight.detach().double().numpy(), centered=centered,
                           stride=2, padding=1, groups=2)
    close(layer(x), y_ref, dtype)


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8)], ids=["(N, in)", "(N, T, in): any leading dims"])
def test_linear_matches_reference(shape, centered):
    x = randn(*shape, seed=5).requires_grad_()
    layer = CosineLinear(8, 3, centered=centered, scale=4.0, dtype=torch.float64)
    y = layer(x)
    dy = randn(*y.shape, seed=6)
    y.backward(dy)
    x2 = x.detach().reshape(-1, 8).numpy()
    y_ref, cache = ref.forward(x2, layer.weight.detach().numpy(), centered=centered, scale=4.0)
    grads = ref.backward(dy.reshape(-1, 3).numpy(), cache)
    close(y.detach().reshape(-1, 3), y_ref, torch.float64)
    close(x.grad.reshape(-1, 8), grads["x"], torch.float64)
    close(layer.weight.grad, grads["w"], torch.float64)
    close(layer.scale.grad, grads["scale"], torch.float64)


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_reference_matches_unfold_and_autograd(centered):
    # The oracle against a one-screen formula: F.unfold the patches, take cosines, let autograd differentiate.
    x = randn(2, 4, 6, 5, seed=7).requires_grad_()
    w = randn(6, 2, 3, 2, seed=8).requires_grad_()
    cols = F.unfold(x, (3, 2), padding=1, stride=(1, 2)).reshape(2, 2, 2 * 3 * 2, -1)  # (N, G, n, L)
    rows = w.reshape(2, 3, -1)  # (G, Og, n)
    if centered:
        cols, rows = cols - cols.mean(2, keepdim=True), rows - rows.mean(2, keepdim=True)
    cos = torch.einsum("gon,Ngnl->Ngol", rows, cols) / (
        rows.norm(dim=2)[None, :, :, None] * cols.norm(dim=2)[:, :, None, :]
    )
    y = cos.reshape(2, 6, 6, 3)
    dy = randn(*y.shape, seed=9)
    y.backward(dy)
    y_ref, cache = ref.forward(x.detach().numpy(), w.detach().numpy(), centered=centered, padding=1,
                               stride=(1, 2), groups=2)
    grads = ref.backward(dy.numpy(), cache)
    close(y_ref, y.detach(), torch.float64)
    close(grads["x"], x.grad, torch.float64)
    close(grads["w"], w.grad, torch.float64)


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_gradcheck_float64(centered):
    x = randn(1, 4, 4, 3, seed=10).requires_grad_()
    w = randn(4, 2, 2, 3, seed=11).requires_grad_()
    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)

    def f(x, w, s):
        return cosine_conv(x, w, padding=1, stride=(1, 2), groups=2, centered=centered, scale=s)

    # fast_mode (random projections): the full Jacobian is already compared entry by entry with the reference
    assert torch.autograd.gradcheck(f, (x, w, s), fast_mode=True)
    xl, wl = randn(3, 5, seed=12).requires_grad_(), randn(2, 5, seed=13).requires_grad_()
    linear = lambda x, w: cosine_linear(x, w, centered=centered)  # noqa: E731
    assert torch.autograd.gradcheck(linear, (xl, wl), fast_mode=True)


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_outputs_are_bounded_by_the_scale(centered):
    # Cauchy–Schwarz: |cos| ≤ 1, up to rounding. An uncapped formula (e.g. dividing by ‖x‖ of the wrong
    # patch) would break it.
    layer = CosineConv2d(3, 8, 3, padding=1, centered=centered, scale=3.0)
    y = layer(3.0 * randn(4, 3, 8, 8, seed=14, dtype=torch.float32))
    assert y.abs().max() <= 3.0 * (1 + 1e-6)
    assert y.abs().max() > 3.0 * 0.5  # and it does use the range


# ---------------------------------------------------------------------------------------------------------
# Zero vectors, constant patches, large offsets
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_patches_and_zero_weight_rows_are_finite(centered, dtype):
    x = randn(2, 3, 9, 9, seed=15, dtype=dtype)
    x[:, :, :5, :5] = 0.0  # interior patches of this 5x5 corner are all zeros
    x[1] = 0.0  # a whole zero sample
    layer = CosineConv2d(3, 4, 3, padding=1, centered=centered, dtype=dtype)
    with torch.no_grad():
        layer.weight[2] = 0.0  # a zero weight row
    x.requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))
    for t in (y, x.grad, layer.weight.grad):
        assert torch.isfinite(t).all()
    assert (y[:, 2] == 0).all() and (y[1] == 0).all()
    assert (y[0, :, 1:4, 1:4] == 0).all()
    y_ref, cache = ref.forward(x.detach().double().numpy(), layer.weight.detach().double().numpy(),
                               centered=centered, padding=1)
    grads = ref.backward(np.ones(y_ref.shape), cache)
    close(y.detach(), y_ref, dtype)
    close(x.grad, grads["x"], dtype)
    close(layer.weight.grad, grads["w"], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_centered_constant_patches_give_zero(dtype):
    # x − μ = 0 for a constant patch: no direction, so output 0 — even though Σx² − (Σx)²/n only reaches 0
    # up to rounding, and even at a large value.
    x = torch.full((2, 3, 7, 7), 1234.5, dtype=dtype)
    x[1] = -0.3
    layer = CosineConv2d(3, 4, 3, centered=True, dtype=dtype)
    x.requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert (y == 0).all() and (x.grad == 0).all()
    w_const = CosineLinear(5, 2, centered=True, dtype=dtype)
    with torch.no_grad():
        w_const.weight.fill_(0.7)  # a constant weight row centers to zero
    assert (w_const(randn(3, 5, dtype=dtype)) == 0).all()


@pytest.mark.parametrize("padding", [0, 1], ids=["valid", "zero-padded: border patches mix 0 and 1e4"])
def test_centered_survives_large_common_offset(padding):
    # x = 1e4 + noise in float32: Σx² − (Σx)²/n would cancel every digit without the shift.
    x = (1e4 + randn(2, 4, 9, 9, seed=16)).float()
    w = randn(5, 4, 3, 3, seed=17).float()
    y_ref, _ = ref.forward(x.double().numpy(), w.double().numpy(), centered=True, padding=padding)
    close(cosine_conv(x, w, centered=True, padding=padding), y_ref, torch.float32)
    xl, wl = (1e4 + randn(6, 50, seed=18)).float(), randn(3, 50, seed=19).float()
    y_ref, _ = ref.forward(xl.double().numpy(), wl.double().numpy(), centered=True)
    close(cosine_linear(xl, wl, centered=True), y_ref, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Memory: no unfolded input
# ---------------------------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_memory_stays_of_the_order_of_input_and_output(centered):
    # A 5x5 kernel: an unfolded input would be 25x the input. Allow the padded input (x 1.3) and no more.
    x = randn(2, 8, 32, 32, dtype=torch.float32).requires_grad_()
    layer = CosineConv2d(8, 8, 5, padding=2, centered=centered)
    padded = 2 * 8 * 36 * 36
    with _LargestTensor() as mode:
        y = layer(x)
        y.backward(torch.ones_like(y))
    assert mode.largest <= padded, f"largest tensor {mode.largest} > padded input {padded}"
    with _LargestTensor() as unfold:
        F.unfold(x.detach(), 5, padding=2)
    assert unfold.largest > 10 * padded  # what the test guards against is measurable (25x the input)


# ---------------------------------------------------------------------------------------------------------
# dtypes, layouts, padding modes, unbatched input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_half_inputs_keep_dtype_and_match_float32(dtype, centered):
    x = randn(2, 4, 9, 9, seed=20, dtype=dtype)
    w = randn(6, 4, 3, 3, seed=21, dtype=dtype)
    y = cosine_conv(x, w, padding=1, centered=centered)
    assert y.dtype == dtype
    close(y.float(), cosine_conv(x.float(), w.float(), padding=1, centered=centered), dtype)
    xl, wl = randn(3, 8, seed=26, dtype=dtype), randn(2, 8, seed=27, dtype=dtype)
    yl = cosine_linear(xl, wl, centered=centered)
    assert yl.dtype == dtype
    close(yl.float(), cosine_linear(xl.float(), wl.float(), centered=centered), dtype)


@pytest.mark.parametrize(
    "layer,shape,fmt",
    [
        (lambda: CosineConv2d(3, 4, 3, padding=1), (2, 3, 6, 6), torch.channels_last),
        (lambda: CosineConv3d(3, 4, 3, padding=1, centered=True), (2, 3, 4, 4, 4), torch.channels_last_3d),
    ],
    ids=["2d channels_last", "3d channels_last_3d"],
)
def test_channels_last_keeps_layout(layer, shape, fmt):
    m = layer()
    x = randn(*shape, seed=22, dtype=torch.float32)
    y_ref = m(x)
    y = m(x.contiguous(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt)
    close(y, y_ref, torch.float32)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_padding_modes_match_reference_on_padded_input(mode, centered):
    layer = CosineConv2d(3, 4, 3, padding=2, padding_mode=mode, centered=centered, dtype=torch.float64)
    x = randn(2, 3, 6, 7, seed=23)
    xp = F.pad(x, (2, 2, 2, 2), mode=mode)  # torch's padding modes; the reference pads with zeros only
    y_ref, _ = ref.forward(xp.numpy(), layer.weight.detach().numpy(), centered=centered)
    close(layer(x), y_ref, torch.float64)


def test_same_padding_and_unbatched_input():
    layer = CosineConv1d(3, 4, 4, padding="same", dilation=2, dtype=torch.float64)
    x = randn(2, 3, 11, seed=24)
    y = layer(x)
    assert y.shape == (2, 4, 11)
    # torch's split of an even total (d·(k−1) = 6): 3 left, 3 right
    y_ref, _ = ref.forward(x.numpy(), layer.weight.detach().numpy(), padding=3, dilation=2)
    close(y, y_ref, torch.float64)
    close(layer(x[0]), y[0], torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Modules: scale, state, repr, copies
# ---------------------------------------------------------------------------------------------------------


# (factory, expected state_dict keys, why)
MODULE_CASES = [
    (lambda: CosineLinear(4, 3), {"weight"}, "no scale: outputs in [-1, 1]"),
    (lambda: CosineLinear(4, 3, scale=10.0), {"weight", "scale"}, "learnable scale"),
    (lambda: CosineConv2d(4, 3, 3, scale=5.0, learn_scale=False), {"weight", "scale"}, "fixed scale buffer"),
    (lambda: CosineConv1d(4, 4, 3, groups=2, centered=True), {"weight"}, "centered, grouped"),
    (lambda: CosineConv3d(2, 3, 2, centered=True, scale=2.0), {"weight", "scale"}, "3d"),
]


@pytest.mark.parametrize("factory,keys,why", MODULE_CASES, ids=[c[2] for c in MODULE_CASES])
def test_module_state_repr_and_copies(factory, keys, why):
    m = factory()
    assert set(m.state_dict()) == keys and m.bias is None
    assert f"centered={m.centered}" in repr(m)
    if m.init_scale is not None:
        assert f"scale={m.init_scale}" in repr(m)
        assert isinstance(m.scale, nn.Parameter) == m.learn_scale
        assert m.scale.item() == m.init_scale
    other = factory()
    other.load_state_dict(m.state_dict(), strict=True)
    shape = (2, 4) if isinstance(m, CosineLinear) else (2, m.in_channels) + (5,) * (m.weight.dim() - 2)
    x = randn(*shape, seed=25, dtype=torch.float32)
    for copied in (other, copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        close(copied(x), m(x), torch.float32)


def test_learnable_scale_trains_and_resets():
    m = CosineLinear(4, 3, scale=10.0)
    y = m(randn(5, 4, dtype=torch.float32))
    y.sum().backward()
    assert m.scale.grad is not None and m.scale.grad != 0
    with torch.no_grad():
        m.scale.fill_(1.0)
    m.reset_parameters()
    assert m.scale.item() == 10.0


# ---------------------------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,cls",
    [
        (nn.Linear(6, 4), CosineLinear),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), CosineConv1d),
        (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=2, groups=2,
                   padding_mode="reflect"), CosineConv2d),
        (nn.Conv3d(2, 3, 2, dtype=torch.float64), CosineConv3d),
    ],
    ids=["Linear", "Conv1d", "Conv2d: every conv option", "Conv3d float64"],
)
def test_registry_builds_matching_cosine_layer(layer, cls):
    assert norm_kind("cosine") == "weight" and norm_kind("cosine_norm") == "weight"
    new = wrap_layer("cosine", layer, centered=True, scale=8.0)
    assert type(new) is cls and new.bias is None and new.centered and new.init_scale == 8.0
    assert torch.equal(new.weight, layer.weight) and new.weight.dtype == layer.weight.dtype
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size", "in_features"):
        assert getattr(new, attr, None) == getattr(layer, attr, None)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: wrap_layer("cosine", nn.ConvTranspose2d(3, 3, 3)), TypeError, "expects nn.Linear or"),
        (lambda: wrap_layer("cosine", nn.LazyLinear(3)), ValueError, "lazy"),
        (lambda: CosineConv2d(4, 3, 3)(torch.zeros(1, 3, 5, 5)), ValueError, r"expects 4 input channels"),
        (lambda: CosineConv2d(4, 3, 3)(torch.zeros(4, 5)), ValueError, r"\(N, C, \*2 spatial\)"),
        (lambda: cosine_conv(torch.zeros(1, 4, 5, 5), torch.ones(4, 2, 3, 3), groups=3),
         ValueError, "groups"),
        (lambda: CosineLinear(4, 3)(torch.zeros(2, 5)), ValueError, r"in_features.*\(2, 5\)"),
        (lambda: CosineLinear(4, 3)(torch.zeros(2, 4, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: CosineLinear(4, 3, scale=-1.0), ValueError, "scale must be None or a finite number > 0"),
        (lambda: CosineLinear(4, 3, eps=-1.0), ValueError, "eps"),
        (lambda: cosine_conv(torch.zeros(1, 2, 5, 5), torch.zeros(2, 2, 3, 3), padding_mode="mirror"),
         ValueError, "padding_mode"),
        (lambda: cosine_conv(torch.zeros(1, 2, 5), torch.zeros(2, 2, 3), padding="same", stride=2),
         ValueError, "stride 1"),
    ],
    ids=["ConvTranspose", "lazy", "channels", "rank", "groups", "linear features", "integer input",
         "negative scale", "negative eps", "padding mode", "same + stride"],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
