"""Group Norm on Triton, and so IN (G = C) and SPEC's LN of a feature map (G = 1): one family.

The input reaches us as the view of `normlab._layout`: NCHW (N, G, C/G, L) or channels_last (N, L, G, C/G).

NCHW: a set k = (n, g) is CG·L consecutive elements (CG = C/G). Three paths, picked by `_path`:

    single   the set (or several small sets) fits in one register tile: x is read once, statistics are
             an exact two-pass in registers, y is written — one launch, 2 passes over memory (the ideal).
             Backward likewise reads x and dy once: 3 passes (the ideal).
    looped   sets too big for registers but enough of them to fill the GPU (N·G ≥ 2·SMs): a persistent
             grid of 2 programs per SM walks the sets; per set a Chan-merged statistics loop, then an apply
             loop that re-reads the set — from L2, since only 2·SMs sets are in flight (fits while a set
             is below ~190 KB; beyond, the re-read costs a third pass over memory).
    staged   few large sets (batch 1, 32 groups: 32 sets for 132 SMs): the shared stage kernels of
             `triton_feature` split every set into position chunks over ~4·SMs programs, then combine.

Tiles are 3-d (BLOCK_K sets, BLOCK_CG channels, BLOCK_L positions), contiguous along L, so per-channel
affine parameters and per-channel gradient sums need no integer division per element; only non-power-of-2
CG or L pay masked lanes.

channels_last: always staged — a program covers a chunk of positions × all channels (C contiguous), and
the group of a column is c // CG, computed once per column.

dγ, dβ never take a second pass over the input: every backward writes Σ_L dy' and Σ_L dy'·x̂ per cell
(n, c) (and position chunk), and one small torch reduction over n (and chunks) gives dβ and dγ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normlab.kernels import triton_feature as stages
from normlab.kernels.triton_feature import TUNING, Cells, activate, activation_grad, pow2, warps

# ---------------------------------------------------------------- kernels (NCHW, one program per set)


@triton.jit
def _set_tile(k0, j0, l0, K, CG, L, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_L: tl.constexpr):
    """Offsets (int64) and mask of the tile (sets k0.., channels j0.., positions l0..) of (N·G, CG, L)."""
    kk = k0 + tl.arange(0, BLOCK_K)
    j = j0 + tl.arange(0, BLOCK_CG)
    pos = l0 + tl.arange(0, BLOCK_L)
    offs = kk.to(tl.int64)[:, None, None] * (CG * L) + (j * L)[None, :, None] + pos[None, None, :]
    mask = (kk < K)[:, None, None] & (j < CG)[None, :, None] & (pos < L)[None, None, :]
    return offs, mask


@triton.jit
def _set_affine(kk, j, w_ptr, b_ptr, G, CG, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """γ, β of channels (k % G)·CG + j as (BLOCK_K, BLOCK_CG, 1) float32 tiles."""
    chan = (kk % G)[:, None] * CG + j[None, :]
    ok = j[None, :] < CG
    gamma = tl.full(chan.shape, 1.0, tl.float32)
    beta = tl.zeros(chan.shape, tl.float32)
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + chan, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        beta = tl.load(b_ptr + chan, mask=ok, other=0.0).to(tl.float32)
    return gamma[:, :, None], beta[:, :, None]


@triton.jit
def _gn_forward_kernel(
    x_ptr, y_ptr,  # (N·G, CG, L) contiguous, any float dtype; y has x's dtype
    w_ptr, b_ptr,  # (C,) affine; the channel of (k, j) is (k % G)·CG + j
    mean_ptr, var_ptr,  # (N·G,) float32 out: mean and biased variance of set k
    K, G, CG, L, eps, inv_m,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_L: tl.constexpr,
):
    #   μ = mean(x),  σ² = mean((x − μ)²),  y = act((x − μ)·rstd·γ + β),  rstd = 1/sqrt(σ² + ε)
    for k0 in range(tl.program_id(0) * BLOCK_K, K, tl.num_programs(0) * BLOCK_K):  # persistent when looped
        kk = k0 + tl.arange(0, BLOCK_K)
        j = tl.arange(0, BLOCK_CG)
        if SINGLE:  # BLOCK_CG ≥ CG and BLOCK_L ≥ L: whole sets in registers, one read
            offs, mask = _set_tile(k0, 0, 0, K, CG, L, BLOCK_K, BLOCK_CG, BLOCK_L)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(tl.sum(x, 2), 1) * inv_m
            d = tl.where(mask, x - mean[:, None, None], 0.0)
            corr = tl.sum(tl.sum(d, 2), 1) * inv_m  # corrected two-pass (as _stats.moments)
            mean += corr
            var = tl.maximum(tl.sum(tl.sum(d * d, 2), 1) * inv_m - corr * corr, 0.0)
            d = tl.where(mask, d - corr[:, None, None], 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)
            gamma, beta = _set_affine(kk, j, w_ptr, b_ptr, G, CG, HAS_WEIGHT, HAS_BIAS)
            y = activate(d * (rstd[:, None, None] * gamma) + beta, ACT)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:  # BLOCK_K == 1: Chan-merged tile moments (as triton_feature._moments_kernel), then apply
            count = 0.0
            mean = tl.zeros([BLOCK_K], tl.float32)
            m2 = tl.zeros([BLOCK_K], tl.float32)
            for j0 in range(0, CG, BLOCK_CG):
                for l0 in range(0, L, BLOCK_L):
                    offs, mask = _set_tile(k0, j0, l0, K, CG, L, BLOCK_K, BLOCK_CG, BLOCK_L)
                    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    n_t = (tl.minimum(CG - j0, BLOCK_CG) * tl.minimum(L - l0, BLOCK_L)).to(tl.float32)
                    mean_t = tl.sum(tl.sum(x, 2), 1) / n_t
                    d = tl.where(mask, x - mean_t[:, None, None], 0.0)
                    sum_d = tl.sum(tl.sum(d, 2), 1)
                    mean_t += sum_d / n_t
                    m2_t = tl.sum(tl.sum(d * d, 2), 1) - sum_d * sum_d / n_t
                    total = count + n_t
                    delta = mean_t - mean
                    mean += delta * (n_t / total)
                    m2 += m2_t + delta * delta * (count * n_t / total)
                    count = total
            var = tl.maximum(m2 * inv_m, 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)
            for j0 in range(0, CG, BLOCK_CG):
                gamma, beta = _set_affine(kk, j0 + j, w_ptr, b_ptr, G, CG, HAS_WEIGHT, HAS_BIAS)
                scale = rstd[:, None, None] * gamma
                for l0 in range(0, L, BLOCK_L):
                    offs, mask = _set_tile(k0, j0, l0, K, CG, L, BLOCK_K, BLOCK_CG, BLOCK_L)
                    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    y = activate((x - mean[:, None, None]) * scale + beta, ACT)
                    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + kk, mean, mask=kk < K)
        tl.store(var_ptr + kk, var, mask=kk < K)


@triton.jit
def _gn_backward_kernel(
    dy_ptr, x_ptr, dx_ptr,  # (N·G, CG, L) contiguous; dx has x's dtype
    w_ptr, b_ptr,  # (C,) affine (β only read with ACT, for the recomputed pre-activation)
    mean_ptr, rstd_ptr,  # (N·G,) float32 statistics of set k
    sdy_ptr, sdyx_ptr,  # (N·C,) float32 out: Σ_L dy' and Σ_L dy'·x̂ of cell (n, c) = k·CG + j
    K, G, CG, L, inv_m,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_L: tl.constexpr,
):
    #   x̂ = (x − μ)·rstd,  dy' = act'(x̂·γ + β)·dy,  g = γ·dy'
    #   c1 = mean_set(g) = Σ_j γ_j Σ_L dy' / m,   c2 = mean_set(g·x̂) = Σ_j γ_j Σ_L dy'·x̂ / m
    #   dx = rstd·(g − c1 − x̂·c2)
    for k0 in range(tl.program_id(0) * BLOCK_K, K, tl.num_programs(0) * BLOCK_K):  # persistent when looped
        kk = k0 + tl.arange(0, BLOCK_K)
        j = tl.arange(0, BLOCK_CG)
        mean = tl.load(mean_ptr + kk, mask=kk < K, other=0.0)[:, None, None]
        rstd = tl.load(rstd_ptr + kk, mask=kk < K, other=0.0)[:, None, None]
        if SINGLE:
            offs, mask = _set_tile(k0, 0, 0, K, CG, L, BLOCK_K, BLOCK_CG, BLOCK_L)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gamma, beta = _set_affine(kk, j, w_ptr, b_ptr, G, CG, HAS_WEIGHT, HAS_BIAS)
            xhat = (x - mean) * rstd
            dy = activation_grad(dy, xhat * gamma + beta, ACT)
            sdy = tl.sum(dy, 2)
            sdyx = tl.sum(dy * xhat, 2)
            cell = kk[:, None] * CG + j[None, :]
            cell_ok = (kk < K)[:, None] & (j < CG)[None, :]
            tl.store(sdy_ptr + cell, sdy, mask=cell_ok)
            tl.store(sdyx_ptr + cell, sdyx, mask=cell_ok)
            if NEED_DX:
                c1 = tl.sum(tl.sum(gamma * sdy[:, :, None], 2), 1) * inv_m
                c2 = tl.sum(tl.sum(gamma * sdyx[:, :, None], 2), 1) * inv_m
                dx = rstd * (dy * gamma - c1[:, None, None] - xhat * c2[:, None, None])
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        else:  # BLOCK_K == 1: a sums loop, then a dx loop
            c1 = tl.zeros([BLOCK_K], tl.float32)
            c2 = tl.zeros([BLOCK_K], tl.float32)
            for j0 in range(0, CG, BLOCK_CG):
                gamma, beta = _set_affine(kk, j0 + j, w_ptr, b_ptr, G, CG, HAS_WEIGHT, HAS_BIAS)
                acc_dy = tl.zeros([BLOCK_K, BLOCK_CG], tl.float32)
                acc_dyx = tl.zeros([BLOCK_K, BLOCK_CG], tl.float32)
                for l0 in range(0, L, BLOCK_L):
                    offs, mask = _set_tile(k0, j0, l0, K, CG, L, BLOCK_K, BLOCK_CG, BLOCK_L)
                    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    xhat = (x - mean) * rstd
                    dy = activation_grad(dy, xhat * gamma + beta, ACT)
                    acc_dy += tl.sum(dy, 2)
                    acc_dyx += tl.sum(dy * xhat, 2)
                cell = kk[:, None] * CG + (j0 + j)[None, :]
                cell_ok = (kk < K)[:, None] & ((j0 + j) < CG)[None, :]
                tl.store(sdy_ptr + cell, acc_dy, mask=cell_ok)
                tl.store(sdyx_ptr + cell, acc_dyx, mask=cell_ok)
                c1 += tl.sum(tl.sum(gamma * acc_dy[:, :, None], 2), 1)
                c2 += tl.sum(tl.sum(gamma * acc_dyx[:, :, None], 2), 1)
            if NEED_DX:
                c1 = (c1 * inv_m)[:, None, None]
                c2 = (c2 * inv_m)[:, None, None]
                for j0 in range(0, CG, BLOCK_CG):
                    gamma, beta = _set_affine(kk, j0 + j, w_ptr, b_ptr, G, CG, HAS_WEIGHT, HAS_BIAS)
                    for l0 in range(0, L, BLOCK_L):
                        offs, mask = _set_tile(k0, j0, l0, K, CG, L, BLOCK_K, BLOCK_CG, BLOCK_L)
                        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                        xhat = (x - mean) * rstd
                        dy = activation_grad(dy, xhat * gamma + beta, ACT)
                        dx = rstd * (dy * gamma - c1 - xhat * c2)
                        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- host launchers


def _geometry(xv: torch.Tensor, view):
    n, groups = xv.shape[0], xv.shape[view.group_dim]
    cg, positions = xv.shape[view.channel_dim], xv.shape[view.position_dim]
    return n, groups, cg, positions


def _set_blocks(cg: int, positions: int, tile: int):
    """(single, BLOCK_K, BLOCK_CG, BLOCK_L) of the one-program-per-set kernels."""
    block_l = min(pow2(positions), tile)
    block_cg = min(pow2(cg), max(1, tile // block_l))
    single = block_cg >= cg and block_l >= positions
    block_k = max(1, tile // (block_cg * block_l)) if single else 1
    return single, block_k, block_cg, block_l


def _path(sets: int, cg: int, positions: int, channels_last: bool, tile: int, device) -> str:
    if channels_last:
        return "staged"
    if TUNING.path is not None:
        return TUNING.path
    if _set_blocks(cg, positions, tile)[0]:
        return "single"
    return "looped" if sets >= 2 * stages.num_sms(device) else "staged"


def _set_launch(cg, positions, sets, path, tile, device):
    single, block_k, block_cg, block_l = _set_blocks(cg, positions, tile)
    if path == "looped":  # forced by tests even when the set would fit a tile
        single, block_k = False, 1
    block_k = min(block_k, stages.spread_over_sms(sets, device))
    programs = triton.cdiv(sets, block_k)
    if not single:  # persistent: few programs in flight, so the sets they re-read still sit in L2
        programs = min(programs, TUNING.looped_programs_per_sm * stages.num_sms(device))
    return (programs,), dict(SINGLE=single, BLOCK_K=block_k, BLOCK_CG=block_cg, BLOCK_L=block_l,
                             num_warps=warps(block_k * block_cg * block_l, 16))


def forward(xv, weight, bias, view, eps: float, act: int):
    """(yv, mean, var) of GN over the view; mean/var (N·G,) float32 in set order n·G + g."""
    n, groups, cg, positions = _geometry(xv, view)
    sets, channels = n * groups, groups * cg
    path = _path(sets, cg, positions, view.channels_last, TUNING.set_tile_forward, xv.device)
    y = torch.empty_like(xv)
    if path == "staged":
        cells = Cells(n, channels, positions, view.channels_last)
        partials = stages.moment_partials(xv, cells)
        chunks = partials[0].shape[-1]
        mean, var, rstd = stages.combine_moments(partials, sets, cg * chunks, eps=eps)
        stages.apply(xv, y, mean, rstd, weight, bias, cells, groups, cg, act)
        return y, mean, var
    mean, var = torch.empty(2, sets, device=xv.device, dtype=torch.float32)
    grid, meta = _set_launch(cg, positions, sets, path, TUNING.set_tile_forward, xv.device)
    _gn_forward_kernel[grid](
        xv, y, _or(weight, mean), _or(bias, mean), mean, var, sets, groups, cg, positions, eps, 1.0 / (cg * positions),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act, **meta,
    )
    return y, mean, var


def backward(dy, xv, weight, bias, mean, rstd, view, needs, act: int):
    """(dx, dweight, dbias) with dweight/dbias (C,) float32; mean/rstd (N·G,) float32."""
    n, groups, cg, positions = _geometry(xv, view)
    sets, channels = n * groups, groups * cg
    need_dx = needs[0]
    path = _path(sets, cg, positions, view.channels_last, TUNING.set_tile_backward, xv.device)
    dx = None
    if path == "staged":
        cells = Cells(n, channels, positions, view.channels_last)
        sums = stages.grad_partials(dy, xv, mean, rstd, weight, bias, cells, groups, cg, act)
        if need_dx:
            ca, cb = stages.combine_grads(sums, weight, rstd, sets, cg, groups, cg * positions)
            dx = stages.grad_input(dy, xv, mean, rstd, ca, cb, weight, bias, cells, groups, cg, act)
        per_channel = sums.view(2, n, channels, -1).sum((1, 3))
    else:
        sums = torch.empty(2, n * channels, device=xv.device, dtype=torch.float32)
        dx = torch.empty_like(xv) if need_dx else sums
        grid, meta = _set_launch(cg, positions, sets, path, TUNING.set_tile_backward, xv.device)
        _gn_backward_kernel[grid](
            dy, xv, dx, _or(weight, mean), _or(bias, mean), mean, rstd, sums[0], sums[1],
            sets, groups, cg, positions, 1.0 / (cg * positions),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act, NEED_DX=need_dx, **meta,
        )
        dx = dx if need_dx else None
        per_channel = sums.view(2, n, channels).sum(1)
    return dx, per_channel[1], per_channel[0]


def _or(t, fallback):
    return fallback if t is None else t
