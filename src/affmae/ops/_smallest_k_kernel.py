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
    block_r = max(1, min(64, 4096 // block_n))
    _smallest_k_kernel[(triton.cdiv(R, block_r),)](flat, out, R, N, K=k, BLOCK_R=block_r,
                                                   BLOCK_N=block_n, num_warps=4)
    return out.view(*d.shape[:-1], k)


@smallest_k_triton.register_fake
def _fake(d: torch.Tensor, k: int) -> torch.Tensor:
    return d.new_empty(*d.shape[:-1], k, dtype=torch.int64)
