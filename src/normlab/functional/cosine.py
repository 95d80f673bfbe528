"""Cosine Normalization, the math: cosine_linear and cosine_conv (see normlab.nn.cosine for the layers)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab._checks import check_tensor
from normlab._stats import stats_dtype

__all__ = ["cosine_conv", "cosine_linear"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}





def _direct_floor(raw_sq_sum: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    """Smallest trustworthy ‖v − mean(v)‖² when v − mean(v) is computed directly: rounding leaves about
    ε·‖v‖ of noise, so a constant vector lands below (16ε)²‖v‖²."""
    tol = 16 * torch.finfo(dtype).eps
    return (tol * tol * raw_sq_sum).clamp_min(eps * eps)


def _inv_norm(sq_sum: Tensor, floor: Tensor | float, eps: float) -> Tensor:
    """1/sqrt(sq_sum) where sq_sum > floor, else 0 (a zero vector: output 0, no gradient, no NaN)."""
    safe = sq_sum.clamp_min(eps * eps)  # keeps rsqrt finite where the mask drops it
    return torch.where(sq_sum > floor, torch.rsqrt(safe), torch.zeros_like(safe))


def _unit_rows(weight: Tensor, centered: bool, eps: float) -> Tensor:
    """ŵ = w/‖w‖ per output unit (row = every axis but 0), after w ← w − mean(w) when centered."""
    axes = tuple(range(1, weight.dim()))
    floor: Tensor | float = eps * eps
    if centered:
        floor = _direct_floor(weight.detach().square().sum(axes, keepdim=True), weight.dtype, eps)
        weight = weight - weight.mean(axes, keepdim=True)  # (O, C/G, *k)
    return weight * _inv_norm(weight.square().sum(axes, keepdim=True), floor, eps)  # (O, C/G, *k)


def _apply_scale(y: Tensor, scale: Tensor | float | None) -> Tensor:
    return y if scale is None else y * scale


def cosine_linear(
    input: Tensor,
    weight: Tensor,
    *,
    centered: bool = False,
    scale: Tensor | float | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """y = scale · ŵ·x/‖x‖ for x of shape (..., in_features) and weight (out_features, in_features).

    ``centered=True`` subtracts the mean of each weight row and of each input vector first. A zero (or,
    centered, constant) input vector or weight row gives 0 and no gradient.
    """
    check_tensor(input, "cosine_linear")
    if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"cosine_linear expects input (..., in_features) and weight (out_features, in_features), got "
            f"input {tuple(input.shape)} and weight {tuple(weight.shape)}"
        )
    cdt = stats_dtype(input.dtype, weight.dtype)
    x = input.to(cdt)  # (..., in)
    floor: Tensor | float = eps * eps
    if centered:
        floor = _direct_floor(x.detach().square().sum(-1, keepdim=True), cdt, eps)  # (..., 1)
        x = x - x.mean(-1, keepdim=True)  # (..., in)
    w_hat = _unit_rows(weight.to(cdt), centered, eps)  # (out, in)
    inv = _inv_norm(x.square().sum(-1, keepdim=True), floor, eps)  # (..., 1)
    y = F.linear(x, w_hat) * inv  # (..., out)
    return _apply_scale(y, scale).to(input.dtype)


def _tuple(value, nd: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * nd
    value = tuple(value)
    if len(value) != nd or not all(isinstance(v, int) for v in value):
        raise ValueError(f"cosine_conv: {what} must be an int or {nd} ints, got {value!r}")
    return value


def _pad_amounts(padding, kernel, dilation, stride) -> list[int]:
    """F.pad's list (last axis first, (left, right) each) for padding given as ints, 'valid' or 'same'."""
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            pairs = [(0, 0)] * nd
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"cosine_conv: padding='same' needs stride 1, got stride={stride}")
            # torch's split: the extra element of an odd total goes to the right
            totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            pairs = [(t // 2, t - t // 2) for t in totals]
        else:
            raise ValueError(f"cosine_conv: padding must be ints, 'valid' or 'same', got {padding!r}")
    else:
        pairs = [(p, p) for p in _tuple(padding, nd, "padding")]
    return [p for pair in reversed(pairs) for p in pair]


def _box_sum(t: Tensor, kernel, stride, dilation) -> Tensor:
    """Sum of t over every kernel window (taps `dilation` apart, windows `stride` apart) in the trailing
    len(kernel) axes: (N, G, *padded) -> (N, G, *out). One strided slice per tap and axis."""
    nd = len(kernel)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation, strict=True)):
        axis = t.dim() - nd + i
        out = (t.shape[axis] - d * (k - 1) - 1) // s + 1
        index = [slice(None)] * t.dim()
        acc = None
        for j in range(k):
            index[axis] = slice(j * d, j * d + s * (out - 1) + 1, s)
            tap = t[tuple(index)]  # (..., out on this axis, ...)
            acc = tap if acc is None else acc + tap
        t = acc
    return t


def cosine_conv(
    input: Tensor,
    weight: Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    centered: bool = False,
    scale: Tensor | float | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Cosine convolution: y = scale · ŵ·x/‖x‖ for every receptive-field patch x.

    input (N, C_in, *spatial) or unbatched (C_in, *spatial); weight (C_out, C_in/groups, *kernel) with 1 to
    3 spatial dims. stride, padding (ints, 'valid' or 'same'), dilation, groups and padding_mode
    ('zeros', 'reflect', 'replicate', 'circular') mean what they mean for torch.nn.Conv2d. A zero (or,
    centered, constant) patch or weight row gives 0 and no gradient.
    """
    who = "cosine_conv"
    check_tensor(input, who)
    nd = weight.dim() - 2
    if nd not in _CONV_FNS:
        raise ValueError(f"{who}: weight must be (C_out, C_in/groups, *kernel) with 1-3 kernel dims, got "
                         f"{tuple(weight.shape)}")
    if input.dim() not in (nd + 1, nd + 2):
        raise ValueError(f"{who}: a {nd}-d kernel expects input (N, C, *{nd} spatial) or (C, *{nd} spatial), "
                         f"got shape {tuple(input.shape)}")
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"{who}: padding_mode must be one of {list(_PAD_MODES)}, got {padding_mode!r}")
    unbatched = input.dim() == nd + 1
    x = input.unsqueeze(0) if unbatched else input  # (N, C, *S)
    n_batch, channels = x.shape[:2]
    out_channels = weight.shape[0]
    if not isinstance(groups, int) or groups <= 0 or channels % groups or out_channels % groups:
        raise ValueError(f"{who}: groups must be a positive int dividing C_in={channels} and "
                         f"C_out={out_channels}, got {groups!r}")
    if channels // groups != weight.shape[1]:
        raise ValueError(f"{who}: weight {tuple(weight.shape)} expects {weight.shape[1] * groups} input "
                         f"channels with groups={groups}, got input of shape {tuple(input.shape)}")
    kernel = tuple(weight.shape[2:])
    stride, dilation = _tuple(stride, nd, "stride"), _tuple(dilation, nd, "dilation")
    pad = _pad_amounts(padding, kernel, dilation, stride)
    cdt = stats_dtype(input.dtype, weight.dtype)
    n = weight[0].numel()  # patch length: C_in/groups × prod(kernel)

    x = x.to(cdt)  # (N, C, *S)
    # Shift invariance: subtracting each (sample, group) mean of the unpadded input from the padded one (so
    # padded zeros move with it) changes no centered patch, and keeps the precision of Σx² − (Σx)²/n.
    shift = x.detach().reshape(n_batch, groups, -1).mean(-1) if centered else None  # (N, G)
    if any(pad):
        x = F.pad(x, pad, mode=_PAD_MODES[padding_mode])  # (N, C, *Sp): patches now need no padding
    by_group = (n_batch, groups, channels // groups) + tuple(x.shape[2:])
    if shift is not None:
        x = x - shift.repeat_interleave(channels // groups, dim=1).reshape((n_batch, channels) + (1,) * nd)
    w_hat = _unit_rows(weight.to(cdt), centered, eps)  # (C_out, C_in/G, *k)
    num = _CONV_FNS[nd](x, w_hat, None, stride, 0, dilation, groups)  # (N, C_out, *L)

    sq_sum = _box_sum(x.square().reshape(by_group).sum(2), kernel, stride, dilation)  # (N, G, *L): Σx²
    floor: Tensor | float = eps * eps
    if centered:
        total = _box_sum(x.reshape(by_group).sum(2), kernel, stride, dilation)  # (N, G, *L): Σx
        # rounding in Σx² − (Σx)²/n is about sqrt(n)·ε·Σx²; below 16 times that the patch is constant
        floor = (16 * math.sqrt(n) * torch.finfo(cdt).eps * sq_sum.detach()).clamp_min(eps * eps)
        sq_sum = sq_sum - total.square() / n  # (N, G, *L): ‖x − μ‖²
    inv = _inv_norm(sq_sum, floor, eps)  # (N, G, *L)

    out_spatial = tuple(num.shape[2:])
    y = num.reshape((n_batch, groups, out_channels // groups) + out_spatial) * inv.unsqueeze(2)
    y = y.reshape((n_batch, out_channels) + out_spatial)  # (N, C_out, *L)
    y = _apply_scale(y, scale).to(input.dtype)
    if unbatched:
        return y.squeeze(0)
    fmt = _CHANNELS_LAST.get(input.dim())
    if fmt is not None and not input.is_contiguous() and input.is_contiguous(memory_format=fmt):
        y = y.contiguous(memory_format=fmt)
    return y
