"""Triton LayerNorm kernels: float32 statistics, output in a chosen dtype (see ``__init__``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 4096  # features per row (one row tile in registers)
_TILE_BWD = 2048  # elements of one backward tile: TILE_M = _TILE_BWD // BLOCK_N rows
_PROGS_BWD = 1024  # backward programs to aim for (a few per SM; each writes one partial row)


@triton.jit
def _fwd_kernel(X, BR, SCALE, S, W, B, Y, MEAN, RSTD, M, N, RPS, eps, BLOCK_N: tl.constexpr,
                ROWS: tl.constexpr, HAS_BR: tl.constexpr, HAS_SCALE: tl.constexpr):
    # HAS_BR: the row is s = x + branch (times SCALE[row // RPS], the sample's drop-path
    # factor, with HAS_SCALE), stored to S in S's dtype and normalised as stored.
    cols = tl.arange(0, BLOCK_N)
    c_ok = cols < N
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)
    for i in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < M:
            r64 = row.to(tl.int64)
            x = tl.load(X + r64 * N + cols, mask=c_ok, other=0.0).to(tl.float32)
            if HAS_BR:
                br = tl.load(BR + r64 * N + cols, mask=c_ok, other=0.0).to(tl.float32)
                if HAS_SCALE:
                    br = br * tl.load(SCALE + row // RPS)
                x = (x + br).to(S.dtype.element_ty)
                tl.store(S + r64 * N + cols, x, mask=c_ok)
                x = x.to(tl.float32)
            mean = tl.sum(x, 0) / N
            xc = tl.where(c_ok, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
            tl.store(Y + r64 * N + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=c_ok)
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_kernel(DY, X, W, MEAN, RSTD, DS, SCALE, DX, DBR, PART, M, N, ROWS, RPS,
                BLOCK_N: tl.constexpr, TILE_M: tl.constexpr, HAS_DS: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_DBR: tl.constexpr):
    # Each program takes ROWS rows (a multiple of TILE_M) in (TILE_M, BLOCK_N) tiles: several
    # rows' loads in flight at once, where one row at a time left the kernel latency-bound
    # (45-50 us for any row count up to 5k on an H200). PART: (2, N, programs) float32,
    # program-minor: d_weight then d_bias partials, reduced by the launcher in one kernel.
    # For s = x + branch * SCALE: DS is the gradient s gets from elsewhere (the residual
    # stream), added to the norm's; DX is then the gradient of x and DBR that of the branch.
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
        if HAS_DS:
            dx += tl.load(DS + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        if HAS_DBR:
            dbr = dx.to(DX.dtype.element_ty).to(tl.float32)
            if HAS_SCALE:
                dbr = dbr * tl.load(SCALE + rows // RPS, mask=r_ok, other=0.0)[:, None]
            tl.store(DBR + offs, dbr.to(DBR.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    tl.store(PART + cols * progs + pid, tl.sum(dw, 0), mask=c_ok)
    tl.store(PART + (N + cols) * progs + pid, tl.sum(db, 0), mask=c_ok)


def _params(N: int) -> tuple[int, int]:
    block_n = max(16, triton.next_power_of_2(N))
    warps = 1 if block_n <= 256 else (4 if block_n <= 1024 else 8)
    return block_n, warps


def _rows2d(t: torch.Tensor, N: int) -> torch.Tensor:
    t2 = t.reshape(-1, N)
    return t2 if t2.is_contiguous() else t2.contiguous()


def _forward(x, branch, scale, weight, bias, eps, out_dtype):
    N = x.shape[-1]
    x2 = _rows2d(x, N)
    M = x2.shape[0]
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    s = None
    if branch is not None:
        br2 = _rows2d(branch, N)
        s = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, branch.dtype),
                        device=x.device)
    if M:
        block_n, warps = _params(N)
        rows = 4
        rps = M // x.shape[0] if x.dim() > 1 and x.shape[0] else M
        _fwd_kernel[(triton.cdiv(M, rows),)](
            x2, br2 if s is not None else x2, scale if scale is not None else mean,
            s if s is not None else y, weight, bias, y, mean, rstd, M, N, max(rps, 1), eps,
            BLOCK_N=block_n, ROWS=rows, HAS_BR=s is not None, HAS_SCALE=scale is not None,
            num_warps=warps)
    return s, y, mean, rstd


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., N) -> y (..., N) in ``out_dtype``, mean and rstd (M,) float32."""
    _, y, mean, rstd = _forward(x, None, None, weight, bias, eps, out_dtype)
    return y.view(x.shape), mean, rstd


def add_forward(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None,
                weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """s = x + branch (* scale[sample]) and its norm: -> s (promoted dtype), y (``out_dtype``),
    mean, rstd. x, branch: (B, ..., N) of one shape; scale: None or (B,) float32."""
    s, y, mean, rstd = _forward(x, branch, scale, weight, bias, eps, out_dtype)
    return s.view(x.shape), y.view(x.shape), mean, rstd


def _backward(dy, x, weight, mean, rstd, ds, scale, branch_dtype):
    N = x.shape[-1]
    x2, dy2 = _rows2d(x, N), _rows2d(dy, N)
    M = x2.shape[0]
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    dbr = None if branch_dtype is None else torch.empty(x2.shape, dtype=branch_dtype,
                                                         device=x.device)
    if M == 0:
        return dx, dbr, torch.zeros(2, N, dtype=torch.float32, device=x.device)
    block_n, warps = _params(N)
    tile_m = max(1, _TILE_BWD // block_n)
    rows = tile_m * triton.cdiv(M, tile_m * _PROGS_BWD)  # per program, a multiple of tile_m
    progs = triton.cdiv(M, rows)
    part = torch.empty(2, N, progs, dtype=torch.float32, device=x.device)  # every slot written
    rps = M // x.shape[0] if x.dim() > 1 and x.shape[0] else M
    _bwd_kernel[(progs,)](dy2, x2, weight, mean, rstd, _rows2d(ds, N) if ds is not None else dy2,
                          scale if scale is not None else mean, dx,
                          dbr if dbr is not None else dx, part, M, N, rows, max(rps, 1),
                          BLOCK_N=block_n, TILE_M=tile_m, HAS_DS=ds is not None,
                          HAS_SCALE=scale is not None, HAS_DBR=dbr is not None,
                          num_warps=max(warps, 4))
    return dx, dbr, part.sum(-1)


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx (x's dtype and shape) and (2, N) float32: d_weight, then d_bias."""
    dx, _, dwb = _backward(dy, x, weight, mean, rstd, None, None, None)
    return dx.view(x.shape), dwb


def add_backward(dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor,
                 weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                 scale: torch.Tensor | None, branch_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``add_forward``: -> d_x (s's dtype), d_branch (``branch_dtype``: d_x times
    the sample's scale) and the (2, N) float32 d_weight / d_bias. ds: the gradient s receives
    besides the norm's (None: none)."""
    dx, dbr, dwb = _backward(dy, s, weight, mean, rstd, ds, scale, branch_dtype)
    return dx.view(s.shape), dbr.view(s.shape), dwb
