"""Switchable Norm (Luo et al., ICLR 2019): a learned softmax mix of IN, LN and BN statistics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from normlab._checks import check_batch_values
from normlab._layout import from_view, to_view
from normlab.functional._normalize import (
    check_param,
    check_running_norm_args,
    needs_graph,
    update_running_stats,
)
from normlab.functional._prepared import prepared
from normlab.kernels import SwitchSpec, select_backend
from normlab.kernels.autograd import SwitchNormFunction
from normlab.kernels.contract import SOURCES


def check_sources(sources, who: str) -> tuple[str, ...]:
    sources = tuple(sources)
    if not sources or len(set(sources)) != len(sources) or not set(sources) <= set(SOURCES):
        raise ValueError(f"{who}: sources must be distinct names from {SOURCES}, got {sources!r}")
    return sources


def check_mixing(input: Tensor, sources: tuple[str, ...], mean_logits, var_logits, who: str) -> int:
    """One logit per source, and positions for IN statistics; returns the positions per channel (L)."""
    for name, logits in (("mean_logits", mean_logits), ("var_logits", var_logits)):
        check_param(logits, len(sources), name, who, f"({len(sources)},) — one per source {sources}")
    positions = math.prod(input.shape[2:])
    if "in" in sources and positions <= 1:
        raise ValueError(
            f"{who}: instance statistics need more than one position per channel, got input of shape "
            f"{tuple(input.shape)}; leave 'in' out of sources for (N, C) inputs (SwitchNorm1d mixes LN and BN)"
        )
    return positions


def switch_norm(
    input: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    sources: tuple[str, ...] = SOURCES,
    authors_compat: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Switchable Normalization of an (N, C, *) input.

        μ = Σ_k softmax(mean_logits)_k μ_k,   σ² = Σ_k softmax(var_logits)_k σ²_k,   k over ``sources``
        y = weight · (x − μ) / sqrt(σ² + eps) + bias

    The logits are ordered like ``sources``. In training (or without running statistics) the BN source uses
    the batch's statistics and, if given, running_mean/var are updated with PyTorch's momentum (the weight
    of the new batch): with the unbiased batch variance, or with the authors' σ²_bn under
    ``authors_compat``. In eval mode with running statistics the BN source uses them.

    ``authors_compat`` reproduces the authors' public implementation: the IN variance is the unbiased one
    and the LN/BN variances are derived from it; for inputs with one position per channel ((N, C), their
    SwitchNorm1d) the LN/BN variances are the unbiased ones over C and over N.
    """
    call = prepared(_prepare, input, weight, bias, mean_logits, var_logits, running_mean, running_var, training,
                    momentum, eps, sources, authors_compat, backend)
    y, batch_mean, batch_var = call.run(input, weight, bias, mean_logits, var_logits, running_mean, running_var, eps)
    if training and batch_mean is not None:
        update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, call.var_factor)
    return y


class SwitchCall(NamedTuple):
    """A prepared SN geometry: run(input, weight, bias, mean_logits, var_logits, running_mean, running_var, eps)
    -> (y, batch_mean, batch_var), the batch's BN statistics (σ² as mixed) or None; and the factor that turns that
    σ² into the running variance's target (the unbiased m/(m − 1), or 1 under authors_compat)."""

    run: Callable
    var_factor: float


class GeneralSwitch(NamedTuple):
    """The run of a backend without its own SN node (or of an input that is not contiguous): view the input with
    G = C on each call and go through `SwitchNormFunction`."""

    channels: int
    spec: SwitchSpec
    backend: object

    def __call__(self, input, weight, bias, mean_logits, var_logits, running_mean, running_var, eps):
        xv, view = to_view(input, self.channels)
        shape = self.spec.affine_shape
        inputs = (
            xv,
            weight.reshape(shape) if weight is not None else None,
            bias.reshape(shape) if bias is not None else None,
            mean_logits.reshape(-1),
            var_logits.reshape(-1),
            running_mean.reshape(shape) if self.spec.running_bn else None,
            running_var.reshape(shape) if self.spec.running_bn else None,
        )
        if needs_graph(*inputs[:5]):
            yv, batch_mean, batch_var = SwitchNormFunction.apply(*inputs, self.spec, eps, self.backend)
            if not batch_mean.numel():  # (the Function's stand-in for None)
                batch_mean = batch_var = None
        else:  # inference: no autograd node to record
            yv, _, _, batch_mean, batch_var = self.backend.switch_forward(*inputs, self.spec, eps)
        return from_view(yv, view), batch_mean, batch_var


def _prepare(input, weight, bias, mean_logits, var_logits, running_mean, running_var, training, momentum, eps,
             sources, authors_compat, backend) -> SwitchCall:
    """Checks and binding of one geometry (see `normlab.functional._prepared`)."""
    who = "switch_norm"
    channels = check_running_norm_args(
        input, who, eps, momentum, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    sources = check_sources(sources, who)
    positions = check_mixing(input, sources, mean_logits, var_logits, who)
    running_bn = "bn" in sources and not training and running_mean is not None and running_var is not None
    count = input.shape[0] * positions
    if "bn" in sources and not running_bn:
        check_batch_values(
            input, count, who,
            "; batch statistics need a batch: build the layer with using_bn=False to mix only IN and LN",
        )
    xv, view = to_view(input, channels)
    spec = SwitchSpec(view, sources, running_bn, authors_compat, view.affine_shape(channels))
    chosen = select_backend(backend, xv, spec)
    var_factor = 1.0 if authors_compat or count < 2 else count / (count - 1)
    own_node = getattr(chosen, "bind_switch", None)  # a backend with its own SN node (the native one)
    if own_node is not None and input.is_contiguous():
        return SwitchCall(own_node(xv, spec), var_factor)
    return SwitchCall(GeneralSwitch(channels, spec, chosen), var_factor)
