"""Triton kernels of ``affmae.ops.smallest_k`` and of the fused nearest-point search
``affmae.ops.clustering.nearest_clusters`` (see there).

``_nearest_k_kernel`` computes each tile of squared distances (dx * dx + dy * dy in float32, no
FMA contraction: the same bits as the PyTorch form's ``(q - k).square().sum(-1)``) in registers
and runs the same k argmin rounds as ``_smallest_k_kernel`` on it. The PyTorch form wrote a
(B, Mq, Mk, 2) difference, its square and the (B, Mq, Mk) sums (three kernels, a diagonal fill
for ``self_first``, then the selection): ten searches per aff_small step.
"""

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
    _argmin_rounds(d.to(tl.float32), cols, rows64, r_ok, OUT, K)


@triton.jit
def _argmin_rounds(d, cols, rows64, r_ok, OUT, K: tl.constexpr):
    """Write the K smallest columns of each row of ``d``, ascending, ties to the lower index."""
    for j in tl.static_range(K):
        idx = tl.argmin(d, axis=1, tie_break_left=True)  # (BLOCK_R,)
        tl.store(OUT + rows64 * K + j, idx.to(tl.int64), mask=r_ok)
        d = tl.where(cols[None, :] == idx[:, None], float("inf"), d)


@triton.jit(do_not_specialize=["R", "Mq", "Mk", "q_batch_stride"])
def _nearest_k_kernel(Q, KP, OUT, R, Mq, Mk, q_batch_stride, K: tl.constexpr,
                      SELF_FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (b, query) rows
    cols = tl.arange(0, BLOCK_N)
    r_ok = rows < R
    rows64 = rows.to(tl.int64)
    b = rows64 // Mq
    i = rows64 % Mq
    qrow = b * q_batch_stride + i * 2  # q_batch_stride 0: one query set for every image
    qx = tl.load(Q + qrow, mask=r_ok, other=0.0)
    qy = tl.load(Q + qrow + 1, mask=r_ok, other=0.0)
    m = r_ok[:, None] & (cols[None, :] < Mk)
    kbase = KP + (b * Mk * 2)[:, None] + cols[None, :] * 2
    dx = qx[:, None] - tl.load(kbase, mask=m, other=0.0)
    dy = qy[:, None] - tl.load(kbase + 1, mask=m, other=0.0)
    d = tl.where(m, dx * dx + dy * dy, float("inf"))
    if SELF_FIRST:  # query i is key i: first whatever the distances
        d = tl.where(cols[None, :] == i[:, None], -1.0, d)
    _argmin_rounds(d, cols, rows64, r_ok, OUT, K)


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


@torch.library.custom_op("affmae::nearest_k", mutates_args=())
def nearest_k_triton(query: torch.Tensor, keys: torch.Tensor, k: int,
                     self_first: bool) -> torch.Tensor:
    """query (B or 1, Mq, 2), keys (B, Mk, 2), float32 -> (B, Mq, k) int64 indices of each
    query's k nearest keys (squared distance, ascending, ties to the lower index; with
    ``self_first`` query i's own key i first)."""
    B, Mk = keys.shape[0], keys.shape[1]
    Mq = query.shape[1]
    query, keys = query.contiguous(), keys.contiguous()
    out = torch.empty(B, Mq, k, dtype=torch.int64, device=keys.device)
    R = B * Mq
    if R == 0 or k == 0:
        return out
    block_n = max(16, triton.next_power_of_2(Mk))
    block_r = _block_rows(R, block_n)
    _nearest_k_kernel[(triton.cdiv(R, block_r),)](
        query, keys, out, R, Mq, Mk, 0 if query.shape[0] == 1 and B > 1 else Mq * 2, K=k,
        SELF_FIRST=self_first, BLOCK_R=block_r, BLOCK_N=block_n,
        num_warps=4 if block_r * block_n >= 1024 else 2, enable_fp_fusion=False)
    return out


@nearest_k_triton.register_fake
def _nearest_fake(query, keys, k, self_first):
    return keys.new_empty(keys.shape[0], query.shape[1], k, dtype=torch.int64)
