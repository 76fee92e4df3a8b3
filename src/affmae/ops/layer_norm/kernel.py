"""Triton LayerNorm kernels: float32 statistics, output in a chosen dtype (see ``__init__``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 4096  # features per row (one row tile in registers)
_ROWS_BWD = 64  # rows per backward program: one partial d_weight / d_bias row each


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
def _bwd_kernel(DY, X, W, MEAN, RSTD, DX, PART, M, N,
                BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    # PART: (2, N, programs) float32, program-minor: d_weight then d_bias partials. The
    # launcher reduces the contiguous last dim in one kernel (two column sums over dim 0 of a
    # (programs, N) layout and their two zero-fills were four launches).
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    c_ok = cols < N
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < M:
            r64 = row.to(tl.int64)
            x = tl.load(X + r64 * N + cols, mask=c_ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * N + cols, mask=c_ok, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(c_ok, (x - mean) * rstd, 0.0)
            g = dy * w
            c1 = tl.sum(g * xhat, 0) / N
            c2 = tl.sum(g, 0) / N
            dx = (g - c2 - xhat * c1) * rstd
            tl.store(DX + r64 * N + cols, dx.to(DX.dtype.element_ty), mask=c_ok)
            dw += dy * xhat
            db += dy
    tl.store(PART + cols * progs + pid, dw, mask=c_ok)
    tl.store(PART + (N + cols) * progs + pid, db, mask=c_ok)


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
    progs = triton.cdiv(M, _ROWS_BWD)
    part = torch.empty(2, N, progs, dtype=torch.float32, device=x.device)  # every slot written
    block_n, warps = _params(N)
    _bwd_kernel[(progs,)](dy2, x2, weight, mean, rstd, dx, part, M, N,
                          BLOCK_N=block_n, ROWS=_ROWS_BWD, num_warps=warps)
    return dx.view(x.shape), part.sum(-1)
