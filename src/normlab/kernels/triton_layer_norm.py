"""LayerNorm over trailing dims on Triton: rows (R, D), per-element affine (torch.nn.LayerNorm's convention).

Forward: a program normalizes BLOCK_R whole rows from registers (rows up to `Tuning.row_tile` wide): x is
read once and y written once — the two passes a clone makes. Wider rows loop over the row twice (a
Chan-merged statistics loop, then an apply loop that re-reads from L2).

Backward (the Liger-Kernel layout): a persistent grid of `Tuning.ln_programs_per_sm` programs per SM; each
program walks its row blocks, reads x and dy once, writes dx, and keeps its share of dγ = Σ dy·x̂ and
dβ = Σ dy in registers; it writes one partial row at the end, and a (P, D) → (D,) torch sum finishes them —
no second pass over the input, no atomics, deterministic. P stays near the SM count because the partials
cost P·D·8 bytes each way. Rows wider than `Tuning.row_tile_backward` loop twice over each row (sums, then
dx) and accumulate dγ/dβ in the program's own partial row in global memory.

Known limit: rows wider than `row_tile` with few rows get one program per row in the forward (e.g. 64 rows
of 65536 use 64 SMs); splitting such rows across programs like the GN staged path is not done.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normlab.kernels import triton_feature as stages
from normlab.kernels.triton_feature import TUNING, pow2, warps


@triton.jit
def _ln_forward_kernel(
    x_ptr, y_ptr,  # (R, D) contiguous rows, any float dtype; y has x's dtype
    w_ptr, b_ptr,  # (D,) elementwise affine, any float dtype
    mean_ptr, var_ptr,  # (R,) float32 out: mean and biased variance of each row
    R, D, eps, inv_d,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    #   μ = mean(x),  σ² = mean((x − μ)²),  y = (x − μ)·rstd·γ + β,  rstd = 1/sqrt(σ² + ε)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    base = rows.to(tl.int64)[:, None] * D
    if SINGLE:  # BLOCK_D ≥ D: whole rows in registers
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) * inv_d
        d = tl.where(mask, x - mean[:, None], 0.0)
        corr = tl.sum(d, 1) * inv_d  # corrected two-pass (as _stats.moments)
        mean += corr
        var = tl.maximum(tl.sum(d * d, 1) * inv_d - corr * corr, 0.0)
        d = tl.where(mask, d - corr[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        y = d * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + base + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # Chan-merged tile moments (see triton_feature._moments_kernel), then an apply loop
        count = 0.0
        mean = tl.zeros([BLOCK_R], tl.float32)
        m2 = tl.zeros([BLOCK_R], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = row_ok[:, None] & (d0 + cols < D)[None, :]
            x = tl.load(x_ptr + base + (d0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            n_t = tl.minimum(D - d0, BLOCK_D).to(tl.float32)
            mean_t = tl.sum(x, 1) / n_t
            d = tl.where(mask, x - mean_t[:, None], 0.0)
            sum_d = tl.sum(d, 1)
            mean_t += sum_d / n_t
            m2_t = tl.sum(d * d, 1) - sum_d * sum_d / n_t
            total = count + n_t
            delta = mean_t - mean
            mean += delta * (n_t / total)
            m2 += m2_t + delta * delta * (count * n_t / total)
            count = total
        var = tl.maximum(m2 * inv_d, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        for d0 in range(0, D, BLOCK_D):
            col_ok = d0 + cols < D
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + base + (d0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + d0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                y = y + tl.load(b_ptr + d0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + base + (d0 + cols)[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(var_ptr + rows, var, mask=row_ok)


@triton.jit
def _ln_backward_kernel(
    dy_ptr, x_ptr, dx_ptr,  # (R, D) contiguous rows; dx has x's dtype
    w_ptr,  # (D,) weight, any float dtype
    mean_ptr, rstd_ptr,  # (R,) float32
    dw_ptr, db_ptr,  # (P, D) float32 out (zero-filled): program p's Σ over its rows of dy·x̂ and dy
    R, D, inv_d,
    HAS_WEIGHT: tl.constexpr, NEED_DX: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    #   x̂ = (x − μ)·rstd,  g = γ·dy,  c1 = mean_row(g),  c2 = mean_row(g·x̂)
    #   dx = rstd·(g − c1 − x̂·c2),   dγ = Σ_rows dy·x̂,  dβ = Σ_rows dy
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    blocks = tl.cdiv(R, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    part = pid.to(tl.int64) * D
    if SINGLE:  # BLOCK_D ≥ D: one read of x and dy per row, dγ/dβ partials in registers
        col_ok = cols < D
        gamma = tl.full([BLOCK_D], 1.0, tl.float32)
        if HAS_WEIGHT:
            gamma = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_dw = tl.zeros([BLOCK_D], tl.float32)
        acc_db = tl.zeros([BLOCK_D], tl.float32)
        for rb in range(pid, blocks, programs):
            rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < R
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            acc_dw += tl.sum(dy * xhat, 0)
            acc_db += tl.sum(dy, 0)
            if NEED_DX:
                g = dy * gamma[None, :]
                c1 = tl.sum(g, 1) * inv_d
                c2 = tl.sum(g * xhat, 1) * inv_d
                dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
                tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + part + cols, acc_dw, mask=col_ok)
        tl.store(db_ptr + part + cols, acc_db, mask=col_ok)
    else:  # wide rows: a sums loop and a dx loop per row block; dγ/dβ into this program's partial row
        for rb in range(pid, blocks, programs):
            rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < R
            base = rows.to(tl.int64)[:, None] * D
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)[:, None]
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
            c1 = tl.zeros([BLOCK_R], tl.float32)
            c2 = tl.zeros([BLOCK_R], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                col_ok = d0 + cols < D
                mask = row_ok[:, None] & col_ok[None, :]
                x = tl.load(x_ptr + base + (d0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + base + (d0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                if HAS_WEIGHT:
                    dy = dy * tl.load(w_ptr + d0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                c1 += tl.sum(dy, 1)
                c2 += tl.sum(dy * xhat, 1)
            c1 = (c1 * inv_d)[:, None]
            c2 = (c2 * inv_d)[:, None]
            for d0 in range(0, D, BLOCK_D):
                col_ok = d0 + cols < D
                mask = row_ok[:, None] & col_ok[None, :]
                x = tl.load(x_ptr + base + (d0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + base + (d0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                acc = dw_ptr + part + d0 + cols
                tl.store(acc, tl.load(acc, mask=col_ok, other=0.0) + tl.sum(dy * xhat, 0), mask=col_ok)
                acc = db_ptr + part + d0 + cols
                tl.store(acc, tl.load(acc, mask=col_ok, other=0.0) + tl.sum(dy, 0), mask=col_ok)
                if NEED_DX:
                    g = dy
                    if HAS_WEIGHT:
                        g = dy * tl.load(w_ptr + d0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                    dx = rstd * (g - c1 - xhat * c2)
                    tl.store(dx_ptr + base + (d0 + cols)[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- host launchers


def _blocks(rows: int, width: int, row_tile: int, device):
    """(single, BLOCK_R, BLOCK_D): whole rows up to ``row_tile``, several rows per tile when narrow (but not
    so many that the grid leaves SMs idle)."""
    block_d = min(pow2(width), row_tile)
    if block_d < width:  # looped: a stage-sized tile per step (a register-sized one spills in the backward)
        return False, 1, min(block_d, TUNING.tile)
    return True, max(1, min(TUNING.tile // block_d, stages.spread_over_sms(rows, device))), block_d


def forward(x: torch.Tensor, weight, bias, eps: float):
    """(y, mean, var) of rows x (R, D); mean/var (R,) float32."""
    rows, width = x.shape
    single, block_r, block_d = _blocks(rows, width, TUNING.row_tile, x.device)
    y = torch.empty_like(x)
    mean, var = torch.empty(2, rows, device=x.device, dtype=torch.float32)
    _ln_forward_kernel[(triton.cdiv(rows, block_r),)](
        x, y, _or(weight, mean), _or(bias, mean), mean, var, rows, width, eps, 1.0 / width,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SINGLE=single,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps(block_r * block_d, 16),
    )
    return y, mean, var


def backward(dy, x, weight, mean, rstd, needs):
    """(dx, dweight, dbias); dweight/dbias (D,) float32; mean/rstd (R,) float32."""
    rows, width = x.shape
    single, block_r, block_d = _blocks(rows, width, TUNING.row_tile_backward, x.device)
    blocks = triton.cdiv(rows, block_r)
    # each program writes a (D,) partial of dγ and of dβ: P·D·8 bytes written and re-read by the final sum,
    # so P stays near the SM count rather than the stage kernels' 4 per SM
    programs = max(1, min(blocks, TUNING.ln_programs_per_sm * stages.num_sms(x.device)))
    partial = torch.zeros(2, programs, width, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if needs[0] else partial
    _ln_backward_kernel[(programs,)](
        dy, x, dx, _or(weight, mean), mean, rstd, partial[0], partial[1], rows, width, 1.0 / width,
        HAS_WEIGHT=weight is not None, NEED_DX=needs[0], SINGLE=single,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps(block_r * block_d, 16),
    )
    sums = partial.sum(1)
    return (dx if needs[0] else None), sums[0], sums[1]


def _or(t, fallback):
    return fallback if t is None else t
