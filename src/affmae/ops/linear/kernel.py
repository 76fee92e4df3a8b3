"""Triton column sum: ``colsum(g)`` = ``g.sum(0)`` of a (M, N) matrix, in float32, deterministic.

Used for a Linear's bias gradient (see ``__init__``). Input: 2-D, float32 / bfloat16 / float16,
any row stride (a copy first makes the columns unit-stride if they are not); output (N,) float32,
summed with float32 accumulation. Unlike ``g.sum(0)`` on a half-precision ``g``, the result is
not rounded to the input dtype.

Two stages, no atomics, so the result is bitwise repeatable:
1. ``_colsum_kernel``: a grid of (column blocks of BLOCK_N) x (SPLIT row splits) programs. Each
   program walks its contiguous run of rows (a multiple of BLOCK_M) in (BLOCK_M, BLOCK_N) tiles,
   loads vectorised along the columns (16 bytes per load where N and the row stride allow),
   adds them into a (BLOCK_M, BLOCK_N) float32 register tile, and at the end reduces that tile
   over its rows into one row of the (SPLIT, N) float32 partials. Row offsets are int64.
2. ``partials.sum(0)``: one small PyTorch reduction (SPLIT <= _MAX_SPLIT rows, well under 1% of
   g's bytes), skipped when SPLIT is 1 (the kernel then writes the result directly).

SPLIT rule: about _TARGET_PROGRAMS programs in all (4 per SM of a 132-SM H200, all resident at
once: enough loads in flight to keep HBM busy, and no tail wave), but at least _MIN_TILES row tiles
per program and at most _MAX_SPLIT partial rows. E.g. (32768, 384): 6 column blocks x 86 splits
of 384 rows; (2176, 72): 2 x 17 splits of 128 rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Measured on an H200 (bf16, M = 2k-65k, N = 72-1536; profiler kernel times, L2 flushed): 64 x 64
# tiles, 8 warps and about 528 programs were within 3% of the best of 51 configurations on
# average (BLOCK_M 32-128, BLOCK_N 64-256, 4 or 8 warps, 264-1056 programs), 10% at worst.
BLOCK_M = 64  # rows per tile
BLOCK_N = 64  # columns per tile (at most)
_WARPS = 8
_TARGET_PROGRAMS = 528  # about 4 per SM of a 132-SM H200
_MIN_TILES = 2  # row tiles per program at least
_MAX_SPLIT = 256  # partial rows at most


@triton.jit
def _colsum_kernel(G, PART, M, N, stride_m, rows_per_split,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr):
    # VEC divides N and stride_m (the launcher checks): written as ``x // VEC * VEC`` the
    # compiler can prove it and vectorise loads that row starts or the column mask would
    # otherwise break into single elements (N = 456 or 72 is not a multiple of 16).
    N = N // VEC * VEC
    stride_m = stride_m // VEC * VEC
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    row0 = pid_s * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        offs = rows.to(tl.int64)[:, None] * stride_m + cols[None, :]  # int64: M * N may pass 2^31
        tile = tl.load(G + offs, mask=(rows < row_end)[:, None] & c_ok[None, :], other=0.0)
        acc += tile.to(tl.float32)
    tl.store(PART + pid_s.to(tl.int64) * N + cols, tl.sum(acc, 0), mask=c_ok)


def _vec(t: torch.Tensor) -> int:
    """Largest power of two (<= 16 bytes of elements) dividing N and the row stride."""
    vec = 16 // t.element_size()
    while vec > 1 and (t.shape[1] % vec or t.stride(0) % vec):
        vec //= 2
    return vec


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain ints: triton.cdiv costs tens of microseconds a call on the host


def _config(M: int, N: int) -> tuple[int, int, int, int]:
    """-> (BLOCK_N, column blocks, SPLIT, rows per split) for a (M, N) input."""
    block_n = min(BLOCK_N, max(16, 1 << (N - 1).bit_length()))  # a power of two >= N
    col_blocks = _cdiv(N, block_n)
    tiles = _cdiv(M, BLOCK_M)
    split = max(1, min(_cdiv(_TARGET_PROGRAMS, col_blocks), tiles // _MIN_TILES, _MAX_SPLIT))
    rows_per_split = _cdiv(tiles, split) * BLOCK_M
    split = _cdiv(M, rows_per_split)  # no program without rows
    return block_n, col_blocks, split, rows_per_split


def colsum(g: torch.Tensor) -> torch.Tensor:
    """g (M, N) float32 / bfloat16 / float16 -> (N,) float32 column sums (see the module
    docstring). No host synchronisation: safe inside CUDA-graph capture."""
    if g.dim() != 2:
        raise ValueError(f"colsum takes a 2-D tensor, got shape {tuple(g.shape)}")
    if g.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"colsum takes float32, bfloat16 or float16, got {g.dtype}")
    M, N = g.shape
    if M == 0 or N == 0:
        return torch.zeros(N, dtype=torch.float32, device=g.device)
    if g.stride(1) != 1 and N > 1:  # the loads are vectorised along unit-stride columns
        g = g.contiguous()
    block_n, col_blocks, split, rows_per_split = _config(M, N)
    out = torch.empty(split, N, dtype=torch.float32, device=g.device)  # every slot written
    _colsum_kernel[(col_blocks, split)](g, out, M, N, g.stride(0), rows_per_split,
                         BLOCK_M=BLOCK_M, BLOCK_N=block_n, VEC=_vec(g), num_warps=_WARPS)
    return out[0] if split == 1 else out.sum(0)
