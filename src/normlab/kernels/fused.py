"""Normalization fused with its activation: GroupNorm + SiLU (a diffusion UNet's block) or BatchNorm + ReLU.

    group_norm_act(x, G, weight, bias, eps, activation="silu")  ≡  act(group_norm(x, G, weight, bias, eps))
    batch_norm_act(x, running_mean, running_var, ...,  activation="relu")  ≡  act(batch_norm(x, ...))

On CUDA the Triton backend applies the activation inside the normalization kernel and differentiates it
inside the backward kernels: the pre-activation never touches memory. Elsewhere (and with
``backend="torch"``) the torch path computes norm then activation in float32. Either way only the input and
the per-set statistics are saved: the backward recomputes the pre-activation x̂·γ + β from them, so memory
stays what the norm alone needs. Double backward works through the torch path, like the plain norms.

``activation`` is "relu", "silu" or None (the plain norm). Conventions as in `normlab.functional`: biased
variance to normalize, unbiased running variance, PyTorch's momentum (the weight of the new batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from normlab._checks import (
    check_batch_values,
    check_dims,
    check_eps,
    check_groups,
    check_momentum,
    check_tensor,
)
from normlab._layout import from_view, to_view
from normlab._stats import moments, stats_dtype
from normlab.kernels import select_backend, torch_backend
from normlab.kernels.contract import batch_spec, group_spec

ACTIVATIONS = ("relu", "silu", None)


def _activate(pre: Tensor, activation: str | None) -> Tensor:
    if activation == "relu":
        return torch.relu(pre)
    if activation == "silu":
        return TF.silu(pre)
    return pre


def _activation_grad(dy: Tensor, pre: Tensor, activation: str | None) -> Tensor:
    # ReLU: dy·[pre > 0];  SiLU: dy·σ(pre)·(1 + pre·(1 − σ(pre)))
    if activation == "relu":
        return dy * (pre > 0)
    if activation == "silu":
        sig = torch.sigmoid(pre)
        return dy * sig * (1 + pre * (1 - sig))
    return dy


def _pre_activation(xv: Tensor, mean: Tensor, rstd: Tensor, weight, bias) -> Tensor:
    """x̂·γ + β in the statistics dtype (float32 at least)."""
    pre = (xv.to(mean.dtype) - mean) * rstd
    if weight is not None:
        pre = pre * weight.to(pre.dtype)
    if bias is not None:
        pre = pre + bias.to(pre.dtype)
    return pre


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


class NormActFunction(torch.autograd.Function):
    """y, mean, var = act(normalize(x over spec.dims)·weight + bias)   (mean and var not differentiable)."""

    @staticmethod
    def forward(ctx, xv, weight, bias, spec, eps, activation, backend):
        if backend is torch_backend:
            mean, var = moments(xv, spec.dims)
            rstd = torch.rsqrt(var + eps)
            yv = _activate(_pre_activation(xv, mean, rstd, weight, bias), activation).to(xv.dtype)
        else:
            yv, mean, rstd, var = backend.forward(xv, weight, bias, spec, eps, activation=activation)
        ctx.save_for_backward(xv, weight, bias, mean, rstd)
        ctx.spec, ctx.eps, ctx.activation, ctx.backend = spec, eps, activation, backend
        ctx.mark_non_differentiable(mean, var)
        return yv, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xv, weight, bias, mean, rstd = ctx.saved_tensors
        backend, needs = ctx.backend, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: make the statistics functions of x again
            mean, var = moments(xv, ctx.spec.dims)
            rstd = torch.rsqrt(var + ctx.eps)
            backend = torch_backend
        if backend is torch_backend:
            pre = _pre_activation(xv, mean, rstd, weight, bias)
            dpre = _activation_grad(dy.to(pre.dtype), pre, ctx.activation)
            dx, dweight, dbias = torch_backend.backward(dpre, xv, weight, mean, rstd, ctx.spec, needs)
        else:
            dx, dweight, dbias = backend.backward(
                dy, xv, weight, mean, rstd, ctx.spec, needs, bias=bias, activation=ctx.activation
            )
        return dx, _cast(dweight, weight), _cast(dbias, bias), None, None, None, None


def _check(input, weight, bias, eps, activation, who):
    check_tensor(input, who)
    check_dims(input, (2, 3, 4, 5), who, "(N, C, *spatial)")
    check_eps(eps, who)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{who}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    channels = input.shape[1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and (not isinstance(param, Tensor) or param.numel() != channels):
            shape = tuple(param.shape) if isinstance(param, Tensor) else type(param).__name__
            raise ValueError(
                f"{who}: {name} must be a Tensor with {channels} elements, shape ({channels},), got {shape}"
            )


def _run(xv, spec, weight, bias, eps, activation, backend, who):
    chosen = select_backend(backend, xv, spec)
    if chosen is not torch_backend and not getattr(chosen, "supports_activation", False):
        if backend not in (None, "auto"):
            raise ValueError(f"{who}: backend {backend!r} has no fused activation; use 'auto', 'torch' or 'triton'")
        chosen = torch_backend
    wv = weight.reshape(spec.affine_shape) if weight is not None else None
    bv = bias.reshape(spec.affine_shape) if bias is not None else None
    return NormActFunction.apply(xv, wv, bv, spec, eps, activation, chosen)


def group_norm_act(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
    *,
    backend: str | None = None,
) -> Tensor:
    """act(group_norm(input, num_groups, weight, bias, eps)) over an (N, C, *) input, in one kernel on CUDA."""
    who = "group_norm_act"
    _check(input, weight, bias, eps, activation, who)
    check_groups(input.shape[1], num_groups, who)
    xv, view = to_view(input, num_groups)
    spec = group_spec(view, num_groups)
    yv, _, _ = _run(xv, spec, weight, bias, eps, activation, backend, who)
    return from_view(yv, view)


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu",
    *,
    backend: str | None = None,
) -> Tensor:
    """act(batch_norm(input, ...)) over an (N, C, *) input, in one kernel on CUDA (training mode).

    Training normalizes with the batch's biased variance and updates the running estimates in place with
    the unbiased one: running ← (1 − momentum)·running + momentum·batch (PyTorch's momentum). Eval mode uses
    the running estimates (torch ops: an elementwise op with no reduction to fuse).
    """
    who = "batch_norm_act"
    _check(input, weight, bias, eps, activation, who)
    if not isinstance(momentum, Tensor):
        if momentum is None:
            raise ValueError(f"{who}: momentum=None is not supported; pass the cumulative factor 1/k instead")
        check_momentum(momentum, who)
    channels = input.shape[1]
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(f"{who}: eval mode (training=False) needs running_mean and running_var, got None")
        acc = stats_dtype(input.dtype)
        shape = (1, channels) + (1,) * (input.dim() - 2)
        scale = torch.rsqrt(running_var.to(acc).reshape(shape) + eps)
        if weight is not None:
            scale = scale * weight.to(acc).reshape(shape)
        pre = (input.to(acc) - running_mean.to(acc).reshape(shape)) * scale
        if bias is not None:
            pre = pre + bias.to(acc).reshape(shape)
        return _activate(pre, activation).to(input.dtype)
    per_channel = input.numel() // channels if channels else 0
    check_batch_values(input, per_channel, who)
    xv, view = to_view(input, channels)
    spec = batch_spec(view)
    yv, mean, var = _run(xv, spec, weight, bias, eps, activation, backend, who)
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, var * (per_channel / (per_channel - 1)))):
            if running is not None:
                weight_new = momentum.to(running.dtype) if isinstance(momentum, Tensor) else momentum
                running.lerp_(batch.reshape(running.shape).to(running.dtype), weight_new)
    return from_view(yv, view)


__all__ = ["batch_norm_act", "group_norm_act"]
