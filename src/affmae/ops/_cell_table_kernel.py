"""Triton kernel of ``affmae.ops.interpolate.cell_neighbours``' ranking step (see there).

One program ranks a block of grid cells: it reads each cell's tile candidates, gathers their
positions, computes the squared distances to the cell centre and keeps the k nearest (k rounds
of a row-wise argmin, ties to the lower candidate slot, as ``smallest_k``). The PyTorch path
materialises (B, cells, Kc*m) candidate slots, their (.., 2) positions and distances, then
selects and gathers: seven kernels and about 100 MB per table at 512 px, batch 16; five tables
per step took 1.7 ms of an aff_small step on an H200 (docs/BENCHMARKS.md, session 5).

Distances are ``dx * dx + dy * dy`` rounded as PyTorch rounds them (products, then the sum; the
kernel is compiled without floating-point contraction), so both paths select the same slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["cells", "gw", "tw", "T", "C", "Nk"])  # sizes: no recompiles
def _cell_table_kernel(CAND, POS, OUT, cells, gw, tw, T, C, Nk, K: tl.constexpr,
                       TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    r_ok = rows < cells
    cy = rows // gw
    cx = rows % gw
    tile = (cy // TILE) * tw + cx // TILE
    ok = r_ok[:, None] & (cols[None, :] < C)
    cand = tl.load(CAND + b * T * C + tile[:, None].to(tl.int64) * C + cols[None, :],
                   mask=ok, other=0)
    px = tl.load(POS + b * Nk * 2 + cand * 2, mask=ok, other=0.0).to(tl.float32)
    py = tl.load(POS + b * Nk * 2 + cand * 2 + 1, mask=ok, other=0.0).to(tl.float32)
    dx = px - cx.to(tl.float32)[:, None]
    dy = py - cy.to(tl.float32)[:, None]
    d = tl.where(ok, dx * dx + dy * dy, float("inf"))
    out = OUT + (b * cells + rows.to(tl.int64)) * K
    for j in tl.static_range(K):
        idx = tl.argmin(d, axis=1, tie_break_left=True)  # (BLOCK_R,)
        hit = cols[None, :] == idx[:, None]
        tl.store(out + j, tl.sum(tl.where(hit, cand, 0), axis=1), mask=r_ok)
        d = tl.where(hit, float("inf"), d)


@torch.library.custom_op("affmae::cell_table", mutates_args=())
def cell_table_triton(cand: torch.Tensor, key_pos: torch.Tensor, gh: int, gw: int, tile: int,
                      k: int) -> torch.Tensor:
    """cand (B, T, C) int64 candidate key slots per tile (tiles of ``tile`` x ``tile`` cells,
    raster order), key_pos (B, Nk, 2) float32 -> (B, gh * gw, k) int32: the k nearest
    candidates of every cell centre, nearest first, ties to the lower candidate slot."""
    B, T, C = cand.shape
    if not 1 <= k <= C:
        raise ValueError(f"k={k} must be in [1, C={C}] (the candidates per tile)")
    cand = cand.contiguous()
    key_pos = key_pos.contiguous()
    cells = gh * gw
    out = torch.empty(B, cells, k, dtype=torch.int32, device=cand.device)
    block_n = max(16, triton.next_power_of_2(C))
    block_r = max(1, min(64, 2048 // block_n))
    tw = triton.cdiv(gw, tile)
    _cell_table_kernel[(triton.cdiv(cells, block_r), B)](
        cand, key_pos, out, cells, gw, tw, T, C, key_pos.shape[1], K=k, TILE=tile,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4, enable_fp_fusion=False)
    return out


@cell_table_triton.register_fake
def _fake(cand, key_pos, gh, gw, tile, k):
    return cand.new_empty(cand.shape[0], gh * gw, k, dtype=torch.int32)
