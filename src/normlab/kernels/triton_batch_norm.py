"""Batch Norm (training statistics) on Triton: a two-stage reduction, then an elementwise pass.

BN's set is a channel across samples and positions, so no program can hold one: every path is staged
(`triton_feature`):

    forward:   per-(n, c, chunk) moments → per-channel Chan combine (mean, var, rstd) → apply
    backward:  per-(n, c, chunk) Σ dy', Σ dy'·x̂ → per-channel dx coefficients → dx;
               dγ = Σ dy'·x̂ and dβ = Σ dy' are the same sums reduced over (n, chunk): no extra pass

Layouts. NCHW (N, C, 1, L) is read as rows of L positions per (n, c). channels_last (N, L, C, 1) — and
NCHW with one position, an (N, C) input — is read as N·L rows of C contiguous channels, all of them one
"sample" to the stage kernels, so partials are per (channel, chunk) and chunks spread the N·L rows over
the GPU. Eval mode never reaches a backend (it is an elementwise op with the running statistics).
"""

from __future__ import annotations

import torch

from normlab.kernels import triton_feature as stages
from normlab.kernels.triton_feature import Cells


def _cells(xv: torch.Tensor, view) -> Cells:
    n, channels, positions = xv.shape[0], xv.shape[view.group_dim], xv.shape[view.position_dim]
    if view.channels_last or positions == 1:
        return Cells(1, channels, n * positions, True)
    return Cells(n, channels, positions, False)


def forward(xv, weight, bias, view, eps: float, act: int):
    """(yv, mean, var); mean/var (C,) float32, var biased (÷ N·L)."""
    cells = _cells(xv, view)
    channels = cells.c
    partials = stages.moment_partials(xv, cells)
    chunks = partials[0].shape[-1]
    # set c owns entries (n, c·S + s): n < N with stride C·S, s < S
    mean, var, rstd = stages.combine_moments(partials, channels, chunks, cells.n, channels * chunks, eps)
    y = torch.empty_like(xv)
    stages.apply(xv, y, mean, rstd, weight, bias, cells, 0, 1, act)  # set of cell (n, c) = c
    return y, mean, var


def backward(dy, xv, weight, bias, mean, rstd, view, needs, act: int):
    """(dx, dweight, dbias); dweight/dbias (C,) float32; mean/rstd (C,) float32."""
    cells = _cells(xv, view)
    channels = cells.c
    sums = stages.grad_partials(dy, xv, mean, rstd, weight, bias, cells, 0, 1, act)
    chunks = sums.shape[-1]
    dx = None
    if needs[0]:
        ca, cb = stages.combine_grads(sums, weight, rstd, channels, 1, channels, cells.n * cells.positions,
                                      cells.n, channels * chunks)
        dx = stages.grad_input(dy, xv, mean, rstd, ca, cb, weight, bias, cells, 0, 1, act)
    per_channel = sums.view(2, cells.n, channels, chunks).sum((1, 3))
    return dx, per_channel[1], per_channel[0]
