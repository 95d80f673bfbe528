"""What every feature-norm function shares: parameter checks, binding a call's geometry to a backend, the call
into the autograd Function, running statistics updates, and normalization with given (running) statistics."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from normlab._checks import check_dims, check_eps, check_momentum, check_tensor
from normlab._layout import from_view, to_view
from normlab._stats import stats_dtype
from normlab.functional._prepared import prepared
from normlab.kernels import NormSpec, native_backend, select_backend
from normlab.kernels.autograd import FeatureNormFunction
from normlab.kernels.contract import Backend, variance


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
    if momentum is None:  # (a module's momentum=None: checked there, passed here as 1/num_batches_tracked)
        raise ValueError(f"{who}: momentum must be a number in [0, 1] or a tensor (a cumulative average's 1/k), "
                         "got None")
    if not isinstance(momentum, Tensor):
        check_momentum(momentum, who)
    channels = input.shape[1]
    check_channel_params(channels, who, **params)
    return channels


def needs_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call (grad mode on and some input requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def bind(input: Tensor, xv: Tensor, spec: NormSpec, requested: str | None,
         general: Callable[[Backend], Callable], statistics: bool = True) -> Callable:
    """The run(input, weight, bias, eps) -> (y, mean, rstd, var) of every call of this geometry (statistics not
    differentiable, var possibly None: see `normlab.kernels.contract.variance`): the chosen backend's own bound
    call when it has one and ``xv`` views the input itself, else ``general(backend)``, which views the input on
    each call and calls `normalize`. A caller that takes y alone says so (``statistics=False``): a bound call
    may then return None for the statistics."""
    chosen = select_backend(requested, xv, spec)
    own_node = getattr(chosen, "bind", None)  # a backend with its own autograd node (see `contract`)
    if own_node is not None and input.is_contiguous():
        return own_node(xv, spec, statistics=statistics)
    return general(chosen)


class FeatureCall(NamedTuple):
    """The general run of a BN/IN/GN geometry (see `bind`): view (N, C, *) as 4-d with G groups, normalize,
    restore the input's shape and layout; given running estimates, update them."""

    groups: int
    spec: NormSpec
    backend: Backend

    def __call__(self, input: Tensor, weight, bias, eps: float, running_mean=None, running_var=None,
                 momentum: float = 0.0):
        xv, view = to_view(input, self.groups)
        yv, mean, rstd, var = normalize(xv, self.spec, weight, bias, eps, self.backend)
        if running_mean is not None or running_var is not None:
            update_batch_running_stats(input, running_mean, running_var, mean, rstd, var, momentum, eps)
        return from_view(yv, view), mean, rstd, var


def feature_call(input: Tensor, groups: int, spec_of: Callable, requested: str | None,
                 statistics: bool = True) -> Callable:
    """`bind` for BN/IN/GN: ``spec_of(view)`` gives the spec of the 4-d view with ``groups`` groups."""
    xv, view = to_view(input, groups)
    spec = spec_of(view)
    return bind(input, xv, spec, requested, lambda chosen: FeatureCall(groups, spec, chosen), statistics)


def normalize(xv: Tensor, spec: NormSpec, weight, bias, eps: float, backend: Backend):
    """(yv, mean, rstd, var) of the view ``xv`` normalized over ``spec.dims`` by ``backend``."""
    own_node = getattr(backend, "bind", None)
    if own_node is not None:  # xv is a copy of the input (a general run): bound for this call only
        return own_node(xv, spec)(xv, weight, bias, eps)
    if not needs_graph(xv, weight, bias):  # inference: no autograd node to record
        shape = spec.affine_shape
        wv = weight.reshape(shape) if weight is not None else None
        bv = bias.reshape(shape) if bias is not None else None
        return backend.forward(xv, wv, bv, spec, eps)
    return FeatureNormFunction.apply(xv, weight, bias, spec, eps, backend)


def normalize_tracking(prepare: Callable, input: Tensor, weight, bias, running_mean, running_var, momentum,
                       eps: float, backend: str | None) -> Tensor:
    """A BN/IN call with the batch's statistics: the run ``prepare`` makes for this geometry (see
    `normlab.functional._prepared`), then the running estimates moved toward the batch's."""
    run = prepared(prepare, input, weight, bias, running_mean, running_var, momentum, eps, backend)
    if running_mean is None and running_var is None:
        return run(input, weight, bias, eps)[0]
    if not isinstance(momentum, Tensor):  # the run updates them (see the contract's ``bind``)
        return run(input, weight, bias, eps, running_mean, running_var, momentum)[0]
    y, mean, rstd, var = run(input, weight, bias, eps)
    update_batch_running_stats(input, running_mean, running_var, mean, rstd, var, momentum, eps)
    return y


def update_batch_running_stats(input: Tensor, running_mean, running_var, mean: Tensor, rstd: Tensor, var, momentum,
                               eps: float) -> None:
    """`update_running_stats` from the statistics of a normalization of ``input`` (var None: from rstd)."""
    m = input.numel() // mean.numel()  # values per statistic: the running variance is unbiased, σ²·m/(m − 1)
    update_running_stats(running_mean, running_var, mean, variance(var, rstd, eps), momentum, m / (m - 1))


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                         momentum: float | Tensor, var_factor: float) -> None:
    """`update_running` for both estimates from a batch's statistics of C channels: one per channel (BN), or
    one per (sample, channel) (IN), averaged over the samples. The running variance takes var·``var_factor``
    (m/(m − 1) for the unbiased σ² of a biased ``var`` over m values). On the CPU one native loop does both
    (tensor ops cost more than a small BN's whole forward)."""
    if running_mean is None and running_var is None:
        return
    if not isinstance(momentum, Tensor) and native_backend.update_running(
        running_mean, running_var, mean, var, momentum, var_factor
    ):
        return
    rows = mean.numel() // (running_mean if running_mean is not None else running_var).numel()
    if running_mean is not None:
        update_running(running_mean, mean if rows == 1 else mean.reshape(rows, -1).mean(0), momentum)
    if running_var is not None:
        var = var * var_factor
        update_running(running_var, var if rows == 1 else var.reshape(rows, -1).mean(0), momentum)


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
