"""Triton stage kernels shared by every feature norm: per-(n, c) partial sums, their combines, and the
elementwise passes. GN/IN/LN (`triton_group_norm`), BN (`triton_batch_norm`) and SN (`triton_switch_norm`)
are each a few launches of these.

Memory layouts, both read natively (no copies):

    NCHW:           rows of positions, (N·C, L) — cell (n, c) is row n·C + c, L contiguous elements
    channels_last:  (N, L, C) — cell (n, c) is column c of sample n, C contiguous channels per position

A program works on 2-d tiles with the contiguous dim last, so loads are coalesced and vectorized (16 bytes
per thread when L resp. C is a multiple of 16, which Triton's argument specialization detects):

    NCHW:           tile (BLOCK_A cells, BLOCK_B positions)     reduce over axis 1
    channels_last:  tile (BLOCK_A positions, BLOCK_B channels)  reduce over axis 0

Parallelism. A program owns one block of cells and one CHUNK of positions, chunk s of S; S is chosen so
that the grid has at least `Tuning.programs_per_sm` programs per SM even when there are few (n, group)
pairs — a diffusion-style (1, 128, 128, 128) GN with 32 groups runs on ~4·SMs programs, not 32. Each pass
writes per-(n, c, s) partials (float32, O(N·C·S), tiny next to the input) and a one-program-per-set
combine reduces them with Chan's formula (offset-stable, no E[x²] − E[x]²).

Stages (k = the statistics set of cell (n, c): n·K_N + c // CG — GN: K_N = G; IN/SN: K_N = C, CG = 1;
BN: K_N = 0, CG = 1):

    forward:   _moments_kernel → _combine_moments_kernel → _apply_kernel            reads x twice
    backward:  _grad_sums_kernel → _combine_grads_kernel → _grad_input_kernel        reads x, dy twice

The second read of each pass is an L2 hit when the tensor fits in L2 (50 MB on an H100 — the few-(n, g)
case this path exists for); larger GN/LN work goes to one-pass or one-program-per-set kernels instead
(`triton_group_norm`, `triton_layer_norm`). An optional activation (ReLU, SiLU) is fused into the apply
pass and differentiated in the backward passes from the recomputed pre-activation x̂·γ + β.

Statistics and sums are float32 whatever the input dtype (float32, float16, bfloat16); outputs have the
input's dtype. Element offsets are int64 per row/sample, so tensors past 2³¹ elements are addressed right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ACTIVATIONS = {None: 0, "relu": 1, "silu": 2}


@dataclass
class Tuning:
    """Launch heuristics of every Triton norm kernel; module-level so tests can shrink tiles to force each
    path on tiny shapes. Untuned defaults: no GPU was lent while writing them (see the closing notes of
    `triton_backend`)."""

    tile: int = 4096  # elements per 2-d tile of a stage kernel (16 KB of float32)
    set_tile_forward: int = 8192  # a GN set up to this many (padded) elements is normalized from registers
    set_tile_backward: int = 4096  # the same for the backward (x and dy both held)
    row_tile: int = 16384  # LayerNorm rows up to this width stay in registers in the forward
    row_tile_backward: int = 8192  # and in the backward (x, dy and the dγ/dβ accumulators: 16384 spills)
    programs_per_sm: int = 4  # a staged pass splits positions into chunks until the grid has this many
    combine_block: int = 1024  # partials a combine program reduces per loop step
    looped_programs_per_sm: int = 2  # the persistent looped GN kernels: SMs × this × set bytes must fit L2
    ln_programs_per_sm: int = 2  # the persistent LayerNorm backward (each program writes a dγ/dβ partial)
    num_sms: int | None = None  # None: read from the device (the CPU interpreter counts 4)
    path: str | None = None  # tests only: force "single", "looped" or "staged" for GN on NCHW


TUNING = Tuning()


def num_sms(device: torch.device) -> int:
    if TUNING.num_sms is not None:
        return TUNING.num_sms
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def spread_over_sms(items: int, device: torch.device) -> int:
    """The most items (a power of 2) one program may take so the grid still has `programs_per_sm` per SM."""
    per_program = items // (TUNING.programs_per_sm * num_sms(device))
    return 1 << max(0, per_program.bit_length() - 1)


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def warps(tile_elements: int, most: int = 8) -> int:
    """About 16 elements per thread: enough independent loads in flight without spilling registers."""
    return max(1, min(most, tile_elements // 512))


# ---------------------------------------------------------------- activation (shared with the other files)

@triton.jit
def activate(pre, ACT: tl.constexpr):
    # ACT: 0 none, 1 ReLU, 2 SiLU = pre·σ(pre)
    if ACT == 1:
        pre = tl.maximum(pre, 0.0)
    elif ACT == 2:
        pre = pre * tl.sigmoid(pre)
    return pre


@triton.jit
def activation_grad(dy, pre, ACT: tl.constexpr):
    # ReLU: dy·[pre > 0] (torch's convention at 0);  SiLU: dy·σ(pre)·(1 + pre·(1 − σ(pre)))
    if ACT == 1:
        dy = tl.where(pre > 0.0, dy, 0.0)
    elif ACT == 2:
        sig = tl.sigmoid(pre)
        dy = dy * sig * (1.0 + pre * (1.0 - sig))
    return dy


# ---------------------------------------------------------------- tile addressing

@triton.jit
def _tile(pid0, pid2, p0, stop, C, L, NC,
          CHANNELS_LAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Offsets (int64) and mask of the tile whose positions start at p0 (see the module docstring)."""
    a = tl.arange(0, BLOCK_A)
    b = tl.arange(0, BLOCK_B)
    if CHANNELS_LAST:
        pos = p0 + a
        chan = pid2 * BLOCK_B + b
        offs = (pid0 * L + pos).to(tl.int64)[:, None] * C + chan[None, :]
        mask = (pos < stop)[:, None] & (chan < C)[None, :]
    else:
        cell = pid0 * BLOCK_A + a
        pos = p0 + b
        offs = cell.to(tl.int64)[:, None] * L + pos[None, :]
        mask = (cell < NC)[:, None] & (pos < stop)[None, :]
    return offs, mask


@triton.jit
def _cells(pid0, pid2, C, NC, CHANNELS_LAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """The program's cells n·C + c (one per tile row in NCHW, per tile column in channels_last)."""
    if CHANNELS_LAST:
        chan = pid2 * BLOCK_B + tl.arange(0, BLOCK_B)
        cell = pid0 * C + chan
        ok = chan < C
    else:
        cell = pid0 * BLOCK_A + tl.arange(0, BLOCK_A)
        ok = cell < NC
    return cell, ok


@triton.jit
def _spread(v, CHANNELS_LAST: tl.constexpr):
    """A per-cell vector broadcast against the tile."""
    if CHANNELS_LAST:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _reduce(t, CHANNELS_LAST: tl.constexpr):
    """Sum a tile over its positions: one value per cell."""
    if CHANNELS_LAST:
        out = tl.sum(t, 0)
    else:
        out = tl.sum(t, 1)
    return out


@triton.jit
def _cell_params(cell, ok, mean_ptr, rstd_ptr, w_ptr, b_ptr, C, K_N, CG,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-cell statistics (of set k = n·K_N + c // CG) and affine parameters, float32."""
    c = cell % C
    k = (cell // C) * K_N + c // CG
    mean = tl.load(mean_ptr + k, mask=ok, other=0.0)
    rstd = tl.load(rstd_ptr + k, mask=ok, other=0.0)
    gamma = tl.full(mean.shape, 1.0, tl.float32)
    beta = tl.zeros(mean.shape, tl.float32)
    if HAS_WEIGHT:
        gamma = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        beta = tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
    return k, mean, rstd, gamma, beta


# ---------------------------------------------------------------- forward: moments, combine, apply

@triton.jit
def _moments_kernel(
    x_ptr,  # NCHW (N·C, L) | channels_last (N, L, C); any float dtype
    cnt_ptr, mean_ptr, m2_ptr,  # (N·C, S) float32: count, mean and Σ(x − mean)² of chunk s of cell (n, c)
    C, L, NC, CHUNK, S,
    CHANNELS_LAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # Per tile a corrected two-pass in registers (μ_t, M2_t over its n_t positions), merged into the running
    # (n, μ, M2) with Chan et al.:  δ = μ_t − μ,  μ += δ·n_t/n',  M2 += M2_t + δ²·n·n_t/n',  n' = n + n_t
    pid0 = tl.program_id(0)
    s = tl.program_id(1)
    pid2 = tl.program_id(2)
    start = s * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    if CHANNELS_LAST:
        STEP: tl.constexpr = BLOCK_A
        mean = tl.zeros([BLOCK_B], tl.float32)
    else:
        STEP: tl.constexpr = BLOCK_B
        mean = tl.zeros([BLOCK_A], tl.float32)
    m2 = tl.zeros_like(mean)
    count = 0.0
    for p0 in range(start, stop, STEP):
        offs, mask = _tile(pid0, pid2, p0, stop, C, L, NC, CHANNELS_LAST, BLOCK_A, BLOCK_B)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_t = tl.minimum(stop - p0, STEP).to(tl.float32)
        mean_t = _reduce(x, CHANNELS_LAST) / n_t
        d = tl.where(mask, x - _spread(mean_t, CHANNELS_LAST), 0.0)
        sum_d = _reduce(d, CHANNELS_LAST)
        mean_t += sum_d / n_t  # the corrected two-pass of _stats.moments: removes μ_t's rounding error
        m2_t = _reduce(d * d, CHANNELS_LAST) - sum_d * sum_d / n_t
        total = count + n_t
        delta = mean_t - mean
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (count * n_t / total)
        count = total
    cell, ok = _cells(pid0, pid2, C, NC, CHANNELS_LAST, BLOCK_A, BLOCK_B)
    out = cell * S + s
    tl.store(cnt_ptr + out, mean * 0.0 + count, mask=ok)
    tl.store(mean_ptr + out, mean, mask=ok)
    tl.store(m2_ptr + out, m2, mask=ok)


@triton.jit
def _combine_moments_kernel(
    cnt_ptr, mean_ptr, m2_ptr,  # partials; set k owns entries (a, k·B + b), a < A (stride stride_a), b < B
    mean_out, var_out, rstd_out,  # (K,) float32: the set's mean, biased variance, 1/sqrt(var + eps)
    A, B, stride_a, eps,
    BLOCK: tl.constexpr,
):
    # Chan's formula over a tile of partials (n_e, μ_e, M2_e), then merged like _moments_kernel:
    #   n_t = Σ n_e,  μ_t = Σ n_e μ_e / n_t,  M2_t = Σ M2_e + n_e (μ_e − μ_t)²
    k = tl.program_id(0)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for e0 in range(0, A * B, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        ok = e < A * B
        offs = (e // B).to(tl.int64) * stride_a + k * B + e % B
        n_e = tl.load(cnt_ptr + offs, mask=ok, other=0.0)
        mean_e = tl.load(mean_ptr + offs, mask=ok, other=0.0)
        m2_e = tl.load(m2_ptr + offs, mask=ok, other=0.0)
        n_t = tl.sum(n_e, 0)
        mean_t = tl.sum(n_e * mean_e, 0) / n_t
        d = mean_e - mean_t
        sum_d = tl.sum(n_e * d, 0)
        mean_t += sum_d / n_t  # corrected, as in _moments_kernel
        m2_t = tl.sum(m2_e + n_e * d * d, 0) - sum_d * sum_d / n_t
        total = count + n_t
        delta = mean_t - mean
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (count * n_t / total)
        count = total
    var = tl.maximum(m2 / count, 0.0)
    tl.store(mean_out + k, mean)
    tl.store(var_out + k, var)
    tl.store(rstd_out + k, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr,  # input layout (see _moments_kernel); y has x's dtype
    mean_ptr, rstd_ptr,  # (K,) float32 statistics of set k
    w_ptr, b_ptr,  # (C,) affine, any float dtype
    C, L, NC, CHUNK, K_N, CG,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    #   y = act((x − μ)·(rstd·γ) + β)   — x − μ first: exact enough under a large common offset
    pid0 = tl.program_id(0)
    s = tl.program_id(1)
    pid2 = tl.program_id(2)
    cell, ok = _cells(pid0, pid2, C, NC, CHANNELS_LAST, BLOCK_A, BLOCK_B)
    k, mean, rstd, gamma, beta = _cell_params(cell, ok, mean_ptr, rstd_ptr, w_ptr, b_ptr, C, K_N, CG,
                                              HAS_WEIGHT, HAS_BIAS)
    mean = _spread(mean, CHANNELS_LAST)
    scale = _spread(rstd * gamma, CHANNELS_LAST)
    shift = _spread(beta, CHANNELS_LAST)
    start = s * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    if CHANNELS_LAST:
        STEP: tl.constexpr = BLOCK_A
    else:
        STEP: tl.constexpr = BLOCK_B
    for p0 in range(start, stop, STEP):
        offs, mask = _tile(pid0, pid2, p0, stop, C, L, NC, CHANNELS_LAST, BLOCK_A, BLOCK_B)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = activate((x - mean) * scale + shift, ACT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- backward: sums, combine, dx

@triton.jit
def _grad_sums_kernel(
    dy_ptr, x_ptr,  # input layout, any float dtype
    mean_ptr, rstd_ptr,  # (K,) float32 statistics of set k
    w_ptr, b_ptr,  # (C,) affine (β only read with ACT: the pre-activation x̂·γ + β is recomputed)
    sdy_ptr, sdyx_ptr,  # (N·C, S) float32: Σ dy' and Σ dy'·x̂ over chunk s of cell (n, c)
    C, L, NC, CHUNK, S, K_N, CG,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    #   x̂ = (x − μ)·rstd,  dy' = act'(x̂·γ + β)·dy  (dy' = dy without activation)
    # Σ dy' and Σ dy'·x̂ per cell give dβ, dγ (summed over n) and the set sums c1, c2 of the dx formula.
    pid0 = tl.program_id(0)
    s = tl.program_id(1)
    pid2 = tl.program_id(2)
    cell, ok = _cells(pid0, pid2, C, NC, CHANNELS_LAST, BLOCK_A, BLOCK_B)
    k, mean, rstd, gamma, beta = _cell_params(cell, ok, mean_ptr, rstd_ptr, w_ptr, b_ptr, C, K_N, CG,
                                              HAS_WEIGHT, HAS_BIAS)
    mean = _spread(mean, CHANNELS_LAST)
    rstd = _spread(rstd, CHANNELS_LAST)
    gamma = _spread(gamma, CHANNELS_LAST)
    beta = _spread(beta, CHANNELS_LAST)
    start = s * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    if CHANNELS_LAST:
        STEP: tl.constexpr = BLOCK_A
        acc_dy = tl.zeros([BLOCK_B], tl.float32)
    else:
        STEP: tl.constexpr = BLOCK_B
        acc_dy = tl.zeros([BLOCK_A], tl.float32)
    acc_dyx = tl.zeros_like(acc_dy)
    for p0 in range(start, stop, STEP):
        offs, mask = _tile(pid0, pid2, p0, stop, C, L, NC, CHANNELS_LAST, BLOCK_A, BLOCK_B)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        dy = activation_grad(dy, xhat * gamma + beta, ACT)
        if CHANNELS_LAST:
            acc_dy += tl.sum(dy, 0)
            acc_dyx += tl.sum(dy * xhat, 0)
        else:
            acc_dy += tl.sum(dy, 1)
            acc_dyx += tl.sum(dy * xhat, 1)
    out = cell * S + s
    tl.store(sdy_ptr + out, acc_dy, mask=ok)
    tl.store(sdyx_ptr + out, acc_dyx, mask=ok)


@triton.jit
def _combine_grads_kernel(
    sdy_ptr, sdyx_ptr,  # partials of _grad_sums_kernel; set k owns entries (a, k·B + b), B = CG·S
    w_ptr,  # (C,) weight; entry (a, k·B + b) is channel (k % G_SETS)·CG + b // S
    rstd_ptr,  # (K,) float32
    ca_ptr, cb_ptr,  # (K,) float32 out: dx = rstd·γ·dy' + ca + cb·(x − μ)
    A, B, S, stride_a, CG, G_SETS, inv_m,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    # SPEC's backward, collected:  g = γ·dy',  c1 = mean_S(g),  c2 = mean_S(g·x̂)
    #   dx = rstd·(g − c1 − x̂·c2)  =  rstd·g + ca + cb·(x − μ),   ca = −rstd·c1,  cb = −rstd²·c2
    k = tl.program_id(0)
    c1 = 0.0
    c2 = 0.0
    for e0 in range(0, A * B, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        ok = e < A * B
        rest = e % B
        offs = (e // B).to(tl.int64) * stride_a + k * B + rest
        sdy = tl.load(sdy_ptr + offs, mask=ok, other=0.0)
        sdyx = tl.load(sdyx_ptr + offs, mask=ok, other=0.0)
        if HAS_WEIGHT:
            gamma = tl.load(w_ptr + (k % G_SETS) * CG + rest // S, mask=ok, other=0.0).to(tl.float32)
            sdy = sdy * gamma
            sdyx = sdyx * gamma
        c1 += tl.sum(sdy, 0)
        c2 += tl.sum(sdyx, 0)
    rstd = tl.load(rstd_ptr + k)
    tl.store(ca_ptr + k, -rstd * c1 * inv_m)
    tl.store(cb_ptr + k, -rstd * rstd * c2 * inv_m)


@triton.jit
def _grad_input_kernel(
    dy_ptr, x_ptr, dx_ptr,  # input layout; dx has x's dtype
    mean_ptr, rstd_ptr, ca_ptr, cb_ptr,  # (K,) float32: dx = rstd·γ·dy' + ca + cb·(x − μ) in set k
    w_ptr, b_ptr,  # (C,) affine
    C, L, NC, CHUNK, K_N, CG,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid0 = tl.program_id(0)
    s = tl.program_id(1)
    pid2 = tl.program_id(2)
    cell, ok = _cells(pid0, pid2, C, NC, CHANNELS_LAST, BLOCK_A, BLOCK_B)
    k, mean, rstd, gamma, beta = _cell_params(cell, ok, mean_ptr, rstd_ptr, w_ptr, b_ptr, C, K_N, CG,
                                              HAS_WEIGHT, HAS_BIAS)
    ca = _spread(tl.load(ca_ptr + k, mask=ok, other=0.0), CHANNELS_LAST)
    cb = _spread(tl.load(cb_ptr + k, mask=ok, other=0.0), CHANNELS_LAST)
    scale = _spread(rstd * gamma, CHANNELS_LAST)
    mean = _spread(mean, CHANNELS_LAST)
    rstd = _spread(rstd, CHANNELS_LAST)
    gamma = _spread(gamma, CHANNELS_LAST)
    beta = _spread(beta, CHANNELS_LAST)
    start = s * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    if CHANNELS_LAST:
        STEP: tl.constexpr = BLOCK_A
    else:
        STEP: tl.constexpr = BLOCK_B
    for p0 in range(start, stop, STEP):
        offs, mask = _tile(pid0, pid2, p0, stop, C, L, NC, CHANNELS_LAST, BLOCK_A, BLOCK_B)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        centered = x - mean
        if ACT != 0:
            dy = activation_grad(dy, centered * rstd * gamma + beta, ACT)
        dx = dy * scale + ca + cb * centered
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- host launchers

@dataclass(frozen=True)
class Cells:
    """A feature tensor as cells (n, c) of L positions, in NCHW rows or channels_last (see the docstring)."""

    n: int
    c: int
    positions: int
    channels_last: bool


@dataclass(frozen=True)
class StagePlan:
    block_a: int
    block_b: int
    chunk: int  # positions per program
    chunks: int  # S
    grid: tuple[int, int, int]
    num_warps: int


def plan(cells: Cells, device: torch.device) -> StagePlan:
    """Tile shape and position chunks: enough programs for every SM even with few cells."""
    tile = TUNING.tile
    n, c, positions = cells.n, cells.c, cells.positions
    if cells.channels_last:
        block_b = min(pow2(c), tile)
        block_a = max(1, min(tile // block_b, pow2(positions)))
        step, base = block_a, n * triton.cdiv(c, block_b)
    else:
        block_b = min(pow2(positions), tile)
        block_a = max(1, min(tile // block_b, pow2(n * c)))
        step, base = block_b, triton.cdiv(n * c, block_a)
    target = TUNING.programs_per_sm * num_sms(device)
    chunks = max(1, min(triton.cdiv(target, base), triton.cdiv(positions, step), 65535))
    chunk = triton.cdiv(triton.cdiv(positions, chunks), step) * step
    chunks = triton.cdiv(positions, chunk)
    if cells.channels_last:
        grid = (n, chunks, triton.cdiv(c, block_b))
    else:
        grid = (base, chunks, 1)
    return StagePlan(block_a, block_b, chunk, chunks, grid, warps(block_a * block_b))


def _common(cells: Cells, p: StagePlan):
    return dict(CHANNELS_LAST=cells.channels_last, BLOCK_A=p.block_a, BLOCK_B=p.block_b, num_warps=p.num_warps)


def moment_partials(x: torch.Tensor, cells: Cells):
    """Per-(n, c, chunk) (count, mean, M2), each (N·C, S) float32."""
    p = plan(cells, x.device)
    cnt, mean, m2 = torch.empty(3, cells.n * cells.c, p.chunks, device=x.device, dtype=torch.float32)
    _moments_kernel[p.grid](
        x, cnt, mean, m2, cells.c, cells.positions, cells.n * cells.c, p.chunk, p.chunks, **_common(cells, p)
    )
    return cnt, mean, m2


def combine_moments(partials, sets: int, per_set: int, outer: int = 1, stride_outer: int = 0, eps: float = 0.0):
    """(mean, var, rstd), each (sets,) float32. Set k owns partial entries (a, k·per_set + b), a < outer."""
    cnt = partials[0]
    mean, var, rstd = torch.empty(3, sets, device=cnt.device, dtype=torch.float32)
    block = min(pow2(outer * per_set), TUNING.combine_block)
    _combine_moments_kernel[(sets,)](
        *partials, mean, var, rstd, outer, per_set, stride_outer, eps, BLOCK=block, num_warps=warps(block, 4)
    )
    return mean, var, rstd


def apply(x, y, mean, rstd, weight, bias, cells: Cells, k_n: int, cg: int, act: int) -> None:
    """y = act((x − μ_k)·rstd_k·γ + β) in place into ``y`` (same layout as x)."""
    p = plan(cells, x.device)
    _apply_kernel[p.grid](
        x, y, mean, rstd, _or(weight, mean), _or(bias, mean),
        cells.c, cells.positions, cells.n * cells.c, p.chunk, k_n, cg,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act, **_common(cells, p),
    )


def grad_partials(dy, x, mean, rstd, weight, bias, cells: Cells, k_n: int, cg: int, act: int):
    """Per-(n, c, chunk) Σ dy' and Σ dy'·x̂ as one (2, N·C, S) float32 tensor."""
    p = plan(cells, x.device)
    sums = torch.empty(2, cells.n * cells.c, p.chunks, device=x.device, dtype=torch.float32)
    _grad_sums_kernel[p.grid](
        dy, x, mean, rstd, _or(weight, mean), _or(bias, mean), sums[0], sums[1],
        cells.c, cells.positions, cells.n * cells.c, p.chunk, p.chunks, k_n, cg,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act, **_common(cells, p),
    )
    return sums


def combine_grads(sums, weight, rstd, sets: int, cg: int, g_sets: int, count: int,
                  outer: int = 1, stride_outer: int = 0):
    """dx coefficients (ca, cb), each (sets,) float32, from `grad_partials`' sums (see the kernel)."""
    chunks = sums.shape[-1]
    ca, cb = torch.empty(2, sets, device=sums.device, dtype=torch.float32)
    block = min(pow2(outer * cg * chunks), TUNING.combine_block)
    _combine_grads_kernel[(sets,)](
        sums[0], sums[1], _or(weight, rstd), rstd, ca, cb,
        outer, cg * chunks, chunks, stride_outer, cg, g_sets, 1.0 / count,
        HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=warps(block, 4),
    )
    return ca, cb


def grad_input(dy, x, mean, rstd, ca, cb, weight, bias, cells: Cells, k_n: int, cg: int, act: int):
    """dx = rstd·γ·dy' + ca + cb·(x − μ) per set, in x's dtype and layout."""
    p = plan(cells, x.device)
    dx = torch.empty_like(x)
    _grad_input_kernel[p.grid](
        dy, x, dx, mean, rstd, ca, cb, _or(weight, mean), _or(bias, mean),
        cells.c, cells.positions, cells.n * cells.c, p.chunk, k_n, cg,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act, **_common(cells, p),
    )
    return dx


def _or(t, fallback):
    """Triton needs a pointer even for a parameter a constexpr flag leaves unread."""
    return fallback if t is None else t
