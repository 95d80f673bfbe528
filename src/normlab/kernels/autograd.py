"""The autograd Functions every feature norm goes through, whatever backend computes it.

Saved for backward: the input (a view, no copy) and per-set statistics — mean and 1/σ for BN/LN/IN/GN, the
per-(n, c) moments for SN — O(N·C) values, never x̂ or anything else of the input's size.

Double backward: when a backward runs with ``create_graph=True`` (grad mode on), the statistics are
recomputed from the saved input with differentiable operations and the portable torch backend's closed
form builds the graph — so every method supports higher-order gradients like torch.nn's norms do.
"""

from __future__ import annotations

import torch

from normlab._stats import moments
from normlab.kernels import torch_backend


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


def _param_grad(grad, param):
    """A parameter's gradient (computed in the broadcast shape, statistics dtype) in the parameter's shape and dtype."""
    return None if grad is None else grad.reshape(param.shape).to(param.dtype)


def _own_tensor(t):
    """``t``'s memory as a tensor that is not a view. Backends may return their output as a view of a buffer
    of another shape; autograd forbids in-place changes (``ReLU(inplace=True)``) to views made inside a
    custom Function, so the output is handed out as a tensor of its own, without a copy."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class FeatureNormFunction(torch.autograd.Function):
    """y, mean, rstd, var = normalize(x over spec.dims) · weight + bias   (the statistics are not differentiable;
    var may be None, see `contract`). ``weight``/``bias`` hold C values in any shape: they are viewed to
    ``spec.affine_shape`` here, where no autograd node records the view, and their gradients get their shape."""

    @staticmethod
    def forward(ctx, xv, weight, bias, spec, eps, backend):
        shape = spec.affine_shape
        wv = None if weight is None else weight.reshape(shape)
        bv = None if bias is None else bias.reshape(shape)
        route = getattr(backend, "forward_routed", None)
        if route is None:
            yv, mean, rstd, var = backend.forward(xv, wv, bv, spec, eps)
        else:  # the backend says which backward takes these statistics (see `contract`)
            (yv, mean, rstd, var), backend = route(xv, wv, bv, spec, eps)
        yv = _own_tensor(yv)
        ctx.save_for_backward(xv, weight, bias, mean, rstd)
        ctx.spec, ctx.eps, ctx.backend = spec, eps, backend
        if var is None:
            ctx.mark_non_differentiable(mean, rstd)
        else:
            ctx.mark_non_differentiable(mean, rstd, var)
        return yv, mean, rstd, var

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd, _dvar):
        xv, weight, bias, mean, rstd = ctx.saved_tensors
        backend, spec = ctx.backend, ctx.spec
        if torch.is_grad_enabled():  # double backward: make the statistics functions of x again
            mean, var = moments(xv, spec.dims)
            rstd = torch.rsqrt(var + ctx.eps)
            backend = torch_backend
        wv = None if weight is None else weight.reshape(spec.affine_shape)
        dx, dweight, dbias = backend.backward(dy, xv, wv, mean, rstd, spec, ctx.needs_input_grad[:3])
        return dx, _param_grad(dweight, weight), _param_grad(dbias, bias), None, None, None


class SwitchNormFunction(torch.autograd.Function):
    """Switchable Norm; returns y and the batch BN statistics (None-like zeros when not computed)."""

    @staticmethod
    def forward(ctx, xv, weight, bias, mean_logits, var_logits, running_mean, running_var, spec, eps, backend):
        yv, mean_in, var_in, batch_mean, batch_var = backend.switch_forward(
            xv, weight, bias, mean_logits, var_logits, running_mean, running_var, spec, eps
        )
        yv = _own_tensor(yv)
        ctx.save_for_backward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var, mean_in, var_in)
        ctx.spec, ctx.eps, ctx.backend = spec, eps, backend
        if batch_mean is None:  # two distinct tensors: torch.compile maps each output to its own gradient
            batch_mean, batch_var = mean_in.new_empty(0), mean_in.new_empty(0)
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return yv, batch_mean, batch_var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xv, weight, bias, mean_logits, var_logits, running_mean, running_var, mean_in, var_in = ctx.saved_tensors
        backend = ctx.backend
        if torch.is_grad_enabled():  # double backward: make the statistics functions of x again
            mean_in, var_in = moments(xv, ctx.spec.view.group_dims)
            backend = torch_backend
        needs = ctx.needs_input_grad[:5]
        dx, dweight, dbias, dmean_logits, dvar_logits = backend.switch_backward(
            dy, xv, weight, mean_logits, var_logits, running_mean, running_var, mean_in, var_in,
            ctx.spec, ctx.eps, needs,
        )
        return (
            dx,
            _cast(dweight, weight),
            _cast(dbias, bias),
            _cast(dmean_logits, mean_logits),
            _cast(dvar_logits, var_logits),
            None, None, None, None, None,
        )
