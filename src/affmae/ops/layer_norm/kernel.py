"""Triton LayerNorm kernels: float32 statistics, output in a chosen dtype (see ``__init__``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 4096  # features per row (one row tile in registers)
_TILE_BWD = 2048  # elements of one backward tile: TILE_M = _TILE_BWD // BLOCK_N rows
_PROGS_BWD = 1024  # backward programs to aim for (a few per SM; each writes one partial row)


@triton.jit
def _fwd_kernel(X, W, B, Y, MEAN, RSTD, M, N, eps, BLOCK_N: tl.constexpr,
                ROWS: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    c_ok = cols < N
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)
    for i in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < M:
            r64 = row.to(tl.int64)
            x = tl.load(X + r64 * N + cols, mask=c_ok, other=0.0).to(tl.float32)
            mean = tl.sum(x, 0) / N
            xc = tl.where(c_ok, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
            tl.store(Y + r64 * N + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=c_ok)
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_kernel(DY, X, W, MEAN, RSTD, DX, PART, M, N, ROWS,
                BLOCK_N: tl.constexpr, TILE_M: tl.constexpr):
    # Each program takes ROWS rows (a multiple of TILE_M) in (TILE_M, BLOCK_N) tiles: several
    # rows' loads in flight at once, where one row at a time left the kernel latency-bound
    # (45-50 us for any row count up to 5k on an H200). PART: (2, N, programs) float32,
    # program-minor: d_weight then d_bias partials, reduced by the launcher in one kernel.
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    c_ok = cols < N
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([TILE_M, BLOCK_N], tl.float32)
    db = tl.zeros([TILE_M, BLOCK_N], tl.float32)
    for i in range(0, ROWS, TILE_M):
        rows = pid * ROWS + i + tl.arange(0, TILE_M)
        r_ok = rows < M
        ok = r_ok[:, None] & c_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=r_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, 1) / N
        c2 = tl.sum(g, 1) / N
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(PART + cols * progs + pid, tl.sum(dw, 0), mask=c_ok)
    tl.store(PART + (N + cols) * progs + pid, tl.sum(db, 0), mask=c_ok)


def _params(N: int) -> tuple[int, int]:
    block_n = max(16, triton.next_power_of_2(N))
    warps = 1 if block_n <= 256 else (4 if block_n <= 1024 else 8)
    return block_n, warps


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., N) -> y (..., N) in ``out_dtype``, mean and rstd (M,) float32."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        block_n, warps = _params(N)
        rows = 4
        _fwd_kernel[(triton.cdiv(M, rows),)](x2, weight, bias, y, mean, rstd, M, N, eps,
                                            BLOCK_N=block_n, ROWS=rows, num_warps=warps)
    return y.view(x.shape), mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx (x's dtype and shape) and (2, N) float32: d_weight, then d_bias."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    dy2 = dy.reshape(-1, N)
    dy2 = dy2 if dy2.is_contiguous() else dy2.contiguous()
    M = x2.shape[0]
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if M == 0:
        return dx.view(x.shape), torch.zeros(2, N, dtype=torch.float32, device=x.device)
    block_n, warps = _params(N)
    tile_m = max(1, _TILE_BWD // block_n)
    rows = tile_m * triton.cdiv(M, tile_m * _PROGS_BWD)  # per program, a multiple of tile_m
    progs = triton.cdiv(M, rows)
    part = torch.empty(2, N, progs, dtype=torch.float32, device=x.device)  # every slot written
    _bwd_kernel[(progs,)](dy2, x2, weight, mean, rstd, dx, part, M, N, rows,
                          BLOCK_N=block_n, TILE_M=tile_m, num_warps=max(warps, 4))
    return dx.view(x.shape), part.sum(-1)
