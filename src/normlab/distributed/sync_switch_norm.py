"""SyncSwitchNorm: Switchable Norm whose BN source spans every process of a torch.distributed group.

IN and LN statistics belong to one sample and stay local; only the BN source pools across samples, so only
it crosses processes — one packed collective per pass (STYLE example 7):

    forward:   all-gather (cells, μ_bn, M2_bn) per process          # 1 + C + C -> (2C + 1) per process
    backward:  all-reduce (Σ_n Gμ, Σ_n Gσ) per channel                # C + C -> 2C

where a cell is one (sample, channel) and Gμ, Gσ are the per-cell gradient sums of
`kernels.torch_backend.switch_backward`, whose helpers (`switch_mix`, `switch_input_terms`,
`switch_logit_grads`) compute everything else. Eval mode with running statistics, a group of one process,
and a layer without the BN source take the local path (`normlab.functional.switch_norm`). Traces whole
under torch.compile(fullgraph=True), like SyncBatchNorm.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab._checks import check_channels, check_dims
from normlab._layout import from_view, to_view
from normlab._stats import moments, pool_moments, stats_dtype
from normlab.distributed._comm import all_reduce_sum, empty_moments, gather_moments, group_size
from normlab.distributed.sync_batch_norm import check_global_count
from normlab.functional._normalize import check_running_norm_args, update_running
from normlab.functional.switch_norm import check_mixing, check_sources
from normlab.kernels import SwitchSpec
from normlab.kernels.contract import SOURCES
from normlab.kernels.torch_backend import (
    _affine,
    _affine_reduce,
    _in_var_scale,
    switch_input_terms,
    switch_logit_grads,
    switch_mix,
)
from normlab.nn._running_stats import exponential_average_factor
from normlab.nn.switch_norm import AUTO, _SwitchNorm


def _group_bn_source(mean_in: Tensor, var_in: Tensor, spec: SwitchSpec, positions: int, group):
    """(μ_bn, σ²_bn, P, f) of the BN source over the group's cells, as `switch_sources` computes it locally.

    Per process: the cells' pooled moments (`pool_moments`, IN variance scaled by s under authors_compat),
    then `gather_moments` over the processes (cells of equal size L, so counting cells is exact).
    """
    sample_dim = spec.view.sample_dim
    cells = mean_in.shape[sample_dim]
    scaled_var_in = var_in * _in_var_scale(positions, spec)
    if cells:
        local_mean, local_var = pool_moments(mean_in, scaled_var_in, (sample_dim,))
    else:
        local_mean, local_var = empty_moments(mean_in, (sample_dim,), mean_in.dtype)
    total, mean_bn, var_bn = gather_moments(cells, local_mean, local_var, group)
    check_global_count(total * positions, cells * positions, "sync_switch_norm")
    total = total.to(mean_bn.dtype)
    f = _unbias(total, spec, positions)
    return mean_bn, var_bn * f, total, f


def _unbias(total: Tensor, spec: SwitchSpec, positions: int) -> Tensor | float:
    """f: the authors' unbiased BN variance P/(P − 1) for inputs with one position per channel."""
    return total / (total - 1) if spec.authors_compat and positions == 1 else 1.0


def _given_bn(spec: SwitchSpec) -> SwitchSpec:
    # The torch backend takes a "running" BN source as given constants: here, the group's statistics.
    return dataclasses.replace(spec, running_bn=True)


class SyncSwitchNormFunction(torch.autograd.Function):
    """yv, μ_bn, running_var_target = Switchable Norm with the BN source over the whole group.

    running_var_target is the BN variance the running estimate moves toward: unbiased over the group's
    values, or the authors' as computed under authors_compat. Neither statistic is differentiable.
    Parameter and logit gradients are this process's share (summed over the processes: the full batch's).
    """

    @staticmethod
    def forward(ctx, xv, weight, bias, mean_logits, var_logits, spec: SwitchSpec, eps: float, group):
        #   μ = Σ_k softmax(λ)_k μ_k,   σ² = Σ_k softmax(λ')_k σ²_k,   y = γ (x − μ)/sqrt(σ² + ε) + β
        #   with μ_bn, σ²_bn over the group's cells and μ_in, σ²_in, μ_ln, σ²_ln per sample, as ever
        positions = xv.shape[spec.view.position_dim]
        mean_in, var_in = moments(xv, spec.view.group_dims)  # per (n, c) cell; empty for an empty shard
        mean_bn, var_bn, total, _ = _group_bn_source(mean_in, var_in, spec, positions, group)
        _, _, _, mean, rstd = switch_mix(
            mean_in, var_in, mean_bn, var_bn, mean_logits, var_logits, _given_bn(spec), positions, eps
        )
        yv = _affine((xv.to(mean.dtype) - mean) * rstd, weight, bias).to(xv.dtype)
        ctx.save_for_backward(xv, weight, mean_logits, var_logits, mean_in, var_in, mean_bn, var_bn, total)
        ctx.spec, ctx.eps, ctx.group = spec, eps, group
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
        values = total * positions
        running_var_target = var_bn * (1.0 if spec.authors_compat else values / (values - 1))
        ctx.mark_non_differentiable(mean_bn, running_var_target)
        return yv, mean_bn, running_var_target

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        #   kernels.torch_backend.switch_backward, with the BN source pooled over the group's P cells:
        #   g = dy·γ, r = 1/sqrt(σ² + ε), per (n, c) cell:  Gμ = −r Σ_pos g,   Gσ = −½ r² Σ_pos g·x̂
        #   dx = g r + Σ_k [ w_k  pool_k(Gμ) / (P_k L)
        #                  + 2 f_k w'_k pool_k(Gσ) / (P_k L) · (s (x − μ_in) + μ_in − μ_k) ]
        #   pool_bn sums over every process's cells (the one all-reduce); IN and LN pool within a sample.
        #   dλ = w ⊙ (a − Σ w a),  a_k = Σ Gμ μ_k over this process's cells;  dλ' likewise;  dγ, dβ local.
        xv, weight, mean_logits, var_logits, mean_in, var_in, mean_bn, var_bn, total = ctx.saved_tensors
        spec, given = ctx.spec, _given_bn(ctx.spec)
        acc = stats_dtype(xv.dtype)
        positions = xv.shape[spec.view.position_dim]
        sources, w, w_var, mean, rstd = switch_mix(
            mean_in, var_in, mean_bn, var_bn, mean_logits, var_logits, given, positions, ctx.eps
        )
        xf, dyf = xv.to(acc), dy.to(acc)
        xhat = (xf - mean) * rstd
        g = dyf * weight.to(acc) if weight is not None else dyf

        cell = spec.view.group_dims
        grad_mean = -rstd * g.sum(cell, keepdim=True)
        grad_var = -0.5 * rstd.square() * (g * xhat).sum(cell, keepdim=True)
        sample = spec.view.sample_dim
        local = [grad_mean.sum(sample, keepdim=True), grad_var.sum(sample, keepdim=True)]
        packed = torch.cat([t.reshape(-1) for t in local])  # C, C -> 2C
        all_reduce_sum(packed, ctx.group)  # always: every process of the group must join
        bn_grad_mean, bn_grad_var = (t.reshape(mean_bn.shape) for t in packed.chunk(2))

        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        dx = dweight = dbias = None
        if need_dx:
            k = spec.sources.index("bn")
            bn_only = dataclasses.replace(spec, sources=("bn",))
            dx = g * rstd
            for coef, shift in (
                # IN, LN: pooled within a sample (the given BN source adds nothing here) ...
                switch_input_terms(grad_mean, grad_var, mean_in, sources, w, w_var, given, positions),
                # ... BN: the group's sums, shaped (1, C, ...) so that pooling them again is a no-op, and
                # divided by the group's P here (P = 1 below): P stays a tensor, with no host sync
                switch_input_terms(
                    bn_grad_mean / total, bn_grad_var / total, mean_in,
                    [(mean_bn, var_bn, 1, _unbias(total, spec, positions))],
                    w[k : k + 1], w_var[k : k + 1], bn_only, positions,
                ),
            ):
                if coef is not None:
                    dx = dx + coef * (xf - mean_in) + shift
            dx = dx.to(xv.dtype)
        weight_dtype, bias_dtype = ctx.param_dtypes
        if need_dweight:
            dweight = _affine_reduce(dyf * xhat, spec.affine_shape).to(weight_dtype)
        if need_dbias:
            dbias = _affine_reduce(dyf, spec.affine_shape).to(bias_dtype)
        dmean_logits, dvar_logits = switch_logit_grads(
            grad_mean, grad_var, sources, w, w_var, ctx.needs_input_grad[3:5]
        )
        if dmean_logits is not None:
            dmean_logits = dmean_logits.to(mean_logits.dtype)
        if dvar_logits is not None:
            dvar_logits = dvar_logits.to(var_logits.dtype)
        return dx, dweight, dbias, dmean_logits, dvar_logits, None, None, None


def sync_switch_norm(
    input: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    sources: tuple[str, ...] = SOURCES,
    authors_compat: bool = False,
    group=None,
) -> Tensor:
    """Training-mode Switchable Norm of an (N, C, *) input, its BN source over every process of ``group``.

    Same arguments and conventions as `normlab.functional.switch_norm` (``sources`` must include "bn"):
    running statistics, if given, move toward the group's BN statistics with PyTorch's momentum (weight of
    the new batch), identically on every process. Every process of the group must call it, an empty batch
    included, and later run its backward.
    """
    who = "sync_switch_norm"
    channels = check_running_norm_args(
        input, who, eps, momentum, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    sources = check_sources(sources, who)
    if "bn" not in sources:
        raise ValueError(f"{who}: sources {sources} have no 'bn' to synchronize; use functional.switch_norm")
    check_mixing(input, sources, mean_logits, var_logits, who)

    xv, view = to_view(input, channels)
    affine_shape = view.affine_shape(channels)
    spec = SwitchSpec(view, sources, False, authors_compat, affine_shape)
    yv, mean_bn, running_var_target = SyncSwitchNormFunction.apply(
        xv,
        weight.reshape(affine_shape) if weight is not None else None,
        bias.reshape(affine_shape) if bias is not None else None,
        mean_logits.reshape(-1),
        var_logits.reshape(-1),
        spec,
        eps,
        group,
    )
    update_running(running_mean, mean_bn, momentum)
    update_running(running_var, running_var_target, momentum)
    return from_view(yv, view)


class SyncSwitchNorm(_SwitchNorm):
    """Switchable Normalization whose BN source has statistics over all processes of a distributed group.

    Everything `normlab.SwitchNorm2d` (1d, 3d) documents holds — the mixed sources, momentum, running
    statistics, ``authors_compat`` and its state_dict — except that in training the BN source's mean and
    variance are those of the whole distributed batch: N processes holding batches b_1..b_N (any sizes, an
    empty one included) behave like one process holding all of them. IN and LN statistics are per sample
    and stay local. One collective per pass: an all-gather of (cells, μ_bn, M2_bn) in forward, an
    all-reduce of the BN source's pooled gradient sums in backward. Works with gloo (CPU) and NCCL, and
    under torch.compile(fullgraph=True), across processes too.

    Eval mode with running statistics, a group of one process, and ``using_bn=False`` take the local path.
    Every process of the group must run forward and backward through the layer in the same order.

    ``dim`` is the number of spatial dims of the input, as in `normlab.create_norm`: 0 or 1 for (N, C) or
    (N, C, L) inputs (mixes LN and BN, like SwitchNorm1d), 2 for (N, C, H, W), 3 for (N, C, D, H, W); it
    fixes the sources and, under ``authors_compat``, the parameter shapes and the default momentum.
    ``process_group``: None for the default group.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None | str = AUTO,
        affine: bool = True,
        track_running_stats: bool = True,
        using_bn: bool = True,
        authors_compat: bool = False,
        last_gamma: bool = False,
        dim: int = 2,
        process_group=None,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        if dim not in (0, 1, 2, 3):
            raise ValueError(
                f"{type(self).__name__}: dim (spatial dims of the input) must be 0, 1, 2 or 3, got {dim!r}"
            )
        # What SwitchNorm1d/2d/3d fix per class, fixed here per instance (read by _SwitchNorm.__init__).
        self._spatial = 0 if dim <= 1 else dim
        self._layout = {0: "(N, C) or (N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}[self._spatial]
        self._authors_decay = 0.9 if dim == 2 else 0.997
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, using_bn, authors_compat, last_gamma,
            device, dtype, backend,
        )
        self.dim = dim
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and "bn" in self.sources and group_size(self.process_group) > 1):
            return super().forward(input)
        who = type(self).__name__
        check_dims(input, self._input_dims, who, self._layout)
        check_channels(input, self.num_features, who)
        factor = exponential_average_factor(self)
        return sync_switch_norm(
            input,
            self.mean_weight,
            self.var_weight,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            factor,
            self.eps,
            sources=self.sources,
            authors_compat=self.authors_compat,
            group=self.process_group,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dim={self.dim}"
