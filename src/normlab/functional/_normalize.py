"""What every feature-norm function shares: parameter checks, the call into the autograd Function, running
statistics updates, and normalization with given (running) statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from normlab._checks import check_dims, check_eps, check_momentum, check_tensor
from normlab._stats import stats_dtype
from normlab.kernels import NormSpec, select_backend
from normlab.kernels.autograd import FeatureNormFunction


def check_param(param: Tensor | None, numel: int, name: str, who: str, shape_text: str) -> None:
    """An affine parameter or running buffer holds one value per channel (any shape, ``numel`` values)."""
    if param is None:
        return
    if not isinstance(param, Tensor):
        raise TypeError(f"{who}: {name} must be a Tensor or None, got {type(param).__name__}")
    if param.numel() != numel:
        raise ValueError(
            f"{who}: {name} must have {numel} elements, shape {shape_text}, got shape {tuple(param.shape)}"
        )


def check_channel_params(channels: int, who: str, **params: Tensor | None) -> None:
    """Every given per-channel parameter or buffer holds ``channels`` values."""
    for name, param in params.items():
        check_param(param, channels, name, who, f"({channels},)")


def check_running_norm_args(
    input, who: str, eps: float, momentum: float | Tensor | None, ndims: tuple[int, ...] = (2, 3, 4, 5), **params
) -> int:
    """The checks shared by the norms with running statistics (BN, IN, SN and their synchronized forms):
    a floating (N, C, *spatial) input, eps, momentum (a tensor is a cumulative-average factor) and per-channel
    ``params``. Returns C."""
    check_tensor(input, who)
    check_dims(input, ndims, who, "(N, C, *spatial)")
    check_eps(eps, who)
    if not isinstance(momentum, Tensor):
        check_momentum(momentum, who)
    channels = input.shape[1]
    check_channel_params(channels, who, **params)
    return channels


def needs_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call (grad mode on and some input requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def normalize(xv: Tensor, spec: NormSpec, weight, bias, eps: float, backend: str | None, input: Tensor | None = None):
    """(yv, mean, rstd, var) of the view ``xv`` normalized over ``spec.dims``; the statistics are not
    differentiable, and var may be None (get it with `normlab.kernels.contract.variance`). ``input``: the
    tensor that ``xv`` views; a backend with its own autograd node may take it whole and return y in its shape
    (`normlab._layout.from_view` takes either)."""
    chosen = select_backend(backend, xv, spec)
    own_node = getattr(chosen, "apply", None)  # a backend with its own autograd node (see `contract`)
    if own_node is not None:
        return own_node(xv, weight, bias, spec, eps, input)
    if not needs_graph(xv, weight, bias):  # inference: no autograd node to record
        shape = spec.affine_shape
        wv = weight.reshape(shape) if weight is not None else None
        bv = bias.reshape(shape) if bias is not None else None
        return chosen.forward(xv, wv, bv, spec, eps)
    return FeatureNormFunction.apply(xv, weight, bias, spec, eps, chosen)


def update_running(running: Tensor | None, batch: Tensor, momentum: float | Tensor) -> None:
    """running ← (1 − momentum) · running + momentum · batch   (PyTorch's convention: momentum weighs the
    new batch). ``momentum`` may be a tensor (a cumulative average 1/k keeps torch.compile graphs whole).
    Never recorded by autograd (a no_grad block only where something requires grad: it costs µs per call)."""
    if running is None:
        return
    if isinstance(momentum, Tensor):
        momentum = momentum.to(running.dtype)
    if batch.dtype != running.dtype:  # (each skipped no-op saves µs on a small call)
        batch = batch.to(running.dtype)
    if batch.shape != running.shape:
        batch = batch.reshape(running.shape)
    if running.requires_grad or batch.requires_grad or isinstance(momentum, Tensor) and momentum.requires_grad:
        with torch.no_grad():
            running.lerp_(batch, momentum)
    else:
        running.lerp_(batch, momentum)


def apply_channel_stats(x: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float) -> Tensor:
    """Normalize with given per-channel statistics (BN/IN in eval mode): y = x·scale + shift with
    scale = γ/sqrt(var + ε), shift = β − mean·scale, computed in float32+. The layout of x is kept."""
    acc = stats_dtype(x.dtype)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(var.to(acc).reshape(-1) + eps)
    if weight is not None:
        scale = scale * weight.to(acc).reshape(-1)
    shift = -mean.to(acc).reshape(-1) * scale
    if bias is not None:
        shift = shift + bias.to(acc).reshape(-1)
    return (x.to(acc) * scale.view(shape) + shift.view(shape)).to(x.dtype)
