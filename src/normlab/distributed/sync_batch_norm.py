"""SyncBatchNorm: Batch Norm whose statistics span every process of a torch.distributed group.

Per pass, one packed collective (STYLE example 7):

    forward:   all-gather (count, mean, M2) per process       # 1 + C + C -> (2C + 1) per process
    backward:  all-reduce (Σ dy, Σ dy·x̂) per channel          # C + C -> 2C

so the sharded computation equals one process holding the whole batch, also when the processes hold
different batch sizes or none at all. Eval mode, and a group of one process, take the local path
(`normlab.functional.batch_norm`). Under torch.compile(fullgraph=True) the collectives and the Function
trace whole (the group's count stays a tensor: no host sync in the graph).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normlab import functional as F
from normlab._checks import check_channels, check_dims
from normlab._layout import from_view, to_view
from normlab._stats import count, moments, stats_dtype
from normlab.distributed._comm import all_reduce_sum, empty_moments, gather_moments, group_size
from normlab.functional._normalize import check_running_norm_args, update_running
from normlab.kernels import NormSpec
from normlab.kernels.contract import batch_spec
from normlab.kernels.torch_backend import _affine
from normlab.nn._running_stats import RunningStatsNorm, exponential_average_factor


def check_global_count(total: Tensor, local: int, who: str) -> None:
    """Training needs more than one value per channel over the whole group (every process raises alike).

    ``total`` is the group's count, a tensor. Eager, a ValueError (reading it syncs host and device once,
    as torch.nn's SyncBatchNorm does); compiled, a device-side assertion, so the graph stays whole.
    """
    message = (
        f"{who}: expected more than 1 value per channel over all processes when training, got fewer "
        f"({local} from this process); give the processes larger batches together"
    )
    if torch.compiler.is_compiling():
        torch._assert_async(total > 1, message)
    elif total.item() <= 1:
        raise ValueError(message)


class SyncBatchNormFunction(torch.autograd.Function):
    """yv, mean, unbiased_var = BN of the view ``xv`` with statistics over the whole group; mean and the
    unbiased variance (÷(n − 1), for the running estimate) are not differentiable. Parameter gradients are
    this process's share: summed over the processes (DDP averages them) they are the full batch's."""

    @staticmethod
    def forward(ctx, xv, weight, bias, spec: NormSpec, eps: float, group):
        local = count(xv, spec.dims)
        acc = stats_dtype(xv.dtype)
        mean, var = moments(xv, spec.dims) if local else empty_moments(xv, spec.dims, acc)
        total, mean, var = gather_moments(local, mean, var, group)
        check_global_count(total, local, "sync_batch_norm")
        rstd = torch.rsqrt(var + eps)
        yv = _affine((xv.to(acc) - mean) * rstd, weight, bias).to(xv.dtype)
        ctx.save_for_backward(xv, weight, mean, rstd, total)
        ctx.spec, ctx.group = spec, group
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
        unbiased_var = var * (total / (total - 1)).to(var.dtype)
        ctx.mark_non_differentiable(mean, unbiased_var)
        return yv, mean, unbiased_var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        #   kernels.torch_backend.backward with the sums over the whole group (n = total per channel):
        #   g = dy·γ,   dx = rstd · (g − c1 − x̂·c2),   c1 = Σg / n = γ Σdy / n,   c2 = Σg·x̂ / n = γ Σdy·x̂ / n
        #   dγ = Σ dy·x̂,  dβ = Σ dy   over this process's values
        xv, weight, mean, rstd, total = ctx.saved_tensors
        dims, acc = ctx.spec.dims, mean.dtype
        dyf = dy.to(acc)
        xhat = (xv.to(acc) - mean) * rstd
        sum_dy = dyf.sum(dims, keepdim=True)  # like mean: one per channel
        sum_dy_xhat = (dyf * xhat).sum(dims, keepdim=True)
        dweight = sum_dy_xhat if ctx.needs_input_grad[1] else None  # the packed copy is what gets reduced
        dbias = sum_dy if ctx.needs_input_grad[2] else None

        # Always reduce, whatever this process needs: every process of the group must join the collective.
        packed = torch.cat([sum_dy.reshape(-1), sum_dy_xhat.reshape(-1)])  # C, C -> 2C
        all_reduce_sum(packed, ctx.group)
        dx = None
        if ctx.needs_input_grad[0]:
            c1, c2 = (part.reshape(mean.shape) / total.to(acc) for part in packed.chunk(2))
            g = dyf
            if weight is not None:
                w = weight.to(acc)
                g, c1, c2 = dyf * w, c1 * w, c2 * w
            dx = (rstd * (g - c1 - xhat * c2)).to(xv.dtype)
        weight_dtype, bias_dtype = ctx.param_dtypes
        dweight = None if dweight is None else dweight.to(weight_dtype)
        dbias = None if dbias is None else dbias.to(bias_dtype)
        return dx, dweight, dbias, None, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    group=None,
) -> Tensor:
    """Training-mode Batch Norm of an (N, C, *) input with statistics over every process of ``group``.

    Same conventions as `normlab.functional.batch_norm`: normalizes with the group's biased variance and, if
    given, updates the running estimates in place with the group's unbiased one, identically on every
    process: running ← (1 − momentum)·running + momentum·batch (PyTorch's momentum, weight of the new batch).
    Every process of the group must call it (a process with an empty batch too), and later run its backward.
    """
    who = "sync_batch_norm"
    channels = check_running_norm_args(
        input, who, eps, momentum, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )

    xv, view = to_view(input, channels)
    spec = batch_spec(view)
    wv = weight.reshape(spec.affine_shape) if weight is not None else None
    bv = bias.reshape(spec.affine_shape) if bias is not None else None
    yv, mean, unbiased_var = SyncBatchNormFunction.apply(xv, wv, bv, spec, eps, group)
    update_running(running_mean, mean, momentum)
    update_running(running_var, unbiased_var, momentum)
    return from_view(yv, view)


class SyncBatchNorm(RunningStatsNorm):
    """Batch Normalization with statistics over all processes of a torch.distributed group.

    Training computes each channel's mean and biased variance over the whole distributed batch — the
    concatenation of every process's input, whatever their sizes, an empty one included — so N processes
    holding batches b_1..b_N behave like one process holding all of them: same outputs, input gradients and
    running statistics (parameter gradients are each process's share; DDP averages them like any other).
    Each pass makes one collective: an all-gather of (count, mean, M2) in forward, combined with Chan's
    parallel formula, and an all-reduce of (Σ dy, Σ dy·x̂) in backward. Works with gloo (CPU) and NCCL,
    and under torch.compile(fullgraph=True), across processes too.

    Eval mode, and a group of one process (or torch.distributed not initialized), take the local path:
    exactly `normlab.BatchNorm{1,2,3}d`. Input (N, C, *spatial) of any dimensionality, like torch.nn's.

    ``momentum`` is PyTorch's, not an optimizer's: running ← (1 − momentum)·running + momentum·batch, with
    the group's unbiased variance; ``momentum=None`` keeps a cumulative average.

    Every process of the group must run forward and backward through the layer in the same order (a
    process with nothing to contribute passes an empty batch), or the others wait in the collective.

    Args as torch.nn.SyncBatchNorm: num_features (C), eps, momentum, affine, track_running_stats,
    process_group (None: the default group), device, dtype, keyword-only bias; ``backend`` picks the local
    path's kernel.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        backend: str = "auto",
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, backend, bias=bias
        )
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        who = type(self).__name__
        check_dims(input, (2, 3, 4, 5), who, "(N, C, *spatial)")
        check_channels(input, self.num_features, who)
        factor = exponential_average_factor(self)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        if self.training and group_size(self.process_group) > 1:
            return sync_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, factor, self.eps, self.process_group
            )
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return F.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, batch_stats, factor, self.eps,
            backend=self.backend,
        )
