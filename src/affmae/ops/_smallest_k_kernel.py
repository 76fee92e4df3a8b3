"""Triton kernel of ``affmae.ops.smallest_k`` (see there)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _smallest_k_kernel(D, OUT, R, N, K: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    r_ok = rows < R
    rows64 = rows.to(tl.int64)
    m = r_ok[:, None] & (cols[None, :] < N)
    d = tl.load(D + rows64[:, None] * N + cols[None, :], mask=m, other=float("inf"))
    d = d.to(tl.float32)
    for j in tl.static_range(K):
        idx = tl.argmin(d, axis=1, tie_break_left=True)  # (BLOCK_R,)
        tl.store(OUT + rows64 * K + j, idx.to(tl.int64), mask=r_ok)
        d = tl.where(cols[None, :] == idx[:, None], float("inf"), d)


_MIN_PROGRAMS = 1024  # a few programs per SM: the k argmin rounds are a chain of reductions


def _block_rows(rows: int, block_n: int) -> int:
    """Rows per program: at most 4096 elements per tile, and few enough rows that the launch has
    about ``_MIN_PROGRAMS`` programs (the searches have 4k-16k rows: 64 rows per program left
    most SMs idle while each program ran its k dependent reductions)."""
    most = max(1, min(64, 4096 // block_n))
    want = max(1, rows // _MIN_PROGRAMS)
    return min(most, 1 << (want.bit_length() - 1))  # a power of two (tl.arange)


@torch.library.custom_op("affmae::smallest_k", mutates_args=())
def smallest_k_triton(d: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel as a custom op: profilers attribute it to the label it runs under, and
    torch.compile / fake tensors see a node with known output shape."""
    N = d.shape[-1]
    flat = d.reshape(-1, N)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    R = flat.shape[0]
    out = torch.empty(R, k, dtype=torch.int64, device=d.device)
    block_n = max(16, triton.next_power_of_2(N))
    block_r = _block_rows(R, block_n)
    _smallest_k_kernel[(triton.cdiv(R, block_r),)](flat, out, R, N, K=k, BLOCK_R=block_r,
                                                   BLOCK_N=block_n,
                                                   num_warps=4 if block_r * block_n >= 1024 else 2)
    return out.view(*d.shape[:-1], k)


@smallest_k_triton.register_fake
def _fake(d: torch.Tensor, k: int) -> torch.Tensor:
    return d.new_empty(*d.shape[:-1], k, dtype=torch.int64)
