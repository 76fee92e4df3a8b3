"""Triton kernels of ``affmae.ops.interpolate.deformable_weights`` (see there).

One deformable-attention head of one query is a group g = (b, q, h) with Pt sampling points of
K selected key slots each. A program takes BLOCK_G groups as (BLOCK_G, PT, BLOCK_K) register
tiles and does, from the projection's raw outputs, what took nine kernels forward (offset cast,
scale, add, cell lookup, point softmax, two divisions, exp, weights) and about eight backward:

    point   = qpos + offset * spacing                 (patch units; rounded to its grid cell,
    slots   = table[cell(point)]                       the cell's K nearest key slots)
    attn_p  = softmax_p(logit_p)                      (over the head's Pt points)
    d_pk    = sqrt(|point / spacing - key_pos[slot_pk] / spacing|^2 + 1e-6)
    w_pk    = attn_p * softmax_k(-exp(log_temp_h) * d_pk)

The forward writes the slots (for the gather and the backward) and w; the backward reads the
slots, recomputes the rest and writes the gradients of the offsets and logits in the input's
dtype and layout ((B * Nq, H * Pt * 3): offsets x/y interleaved, then logits; what the
projection's backward takes without a cast or a concatenation) and one log-temperature
partial per group (summed per head by the caller).

Rounding follows the PyTorch form where it can: no FMA contraction (``enable_fp_fusion=False``),
correctly rounded division and square root; ``exp`` and the reduction order may differ by an
ulp. The offset gradient is the gradient of ``point / spacing`` as it is: the form's ``/ spacing``
then ``* spacing`` cancel exactly in real arithmetic, within an ulp in float32 (tests: the
three-way rule against float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from affmae.ops._cell_lookup_kernel import _round_half_even

MAX_K = 64
MAX_PT = 16
_SIZES = ["G", "H", "Pt", "Nq", "Nk", "stride_row"]  # runtime sizes: never specialised


@triton.jit
def _points(OL, QP, g, g_ok, p, H, Pt, Nq, stride_row, spacing, PT: tl.constexpr):
    """Offsets, logits and points of BLOCK_G groups: (BLOCK_G, PT) float32 tiles."""
    gp_ok = g_ok[:, None] & (p < Pt)[None, :]
    bq = (g // H).to(tl.int64)  # the (b, q) row
    h = g % H
    col = h[:, None] * Pt + p[None, :]  # (BLOCK_G, PT): the point's column among H * Pt
    base = OL + bq[:, None] * stride_row
    ox = tl.load(base + col * 2, mask=gp_ok, other=0.0).to(tl.float32)
    oy = tl.load(base + col * 2 + 1, mask=gp_ok, other=0.0).to(tl.float32)
    lg = tl.load(base + H * Pt * 2 + col, mask=gp_ok, other=0.0).to(tl.float32)
    qx = tl.load(QP + bq * 2, mask=g_ok, other=0.0)
    qy = tl.load(QP + bq * 2 + 1, mask=g_ok, other=0.0)
    px = qx[:, None] + ox * spacing
    py = qy[:, None] + oy * spacing
    return gp_ok, bq, h, col, lg, px, py


@triton.jit
def _point_softmax(lg, gp_ok):
    z = tl.where(gp_ok, lg, float("-inf"))
    m = tl.max(z, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # groups past the end: no NaN
    e = tl.where(gp_ok, tl.exp(z - m[:, None]), 0.0)
    s = tl.sum(e, 1)
    return e / tl.where(s > 0.0, s, 1.0)[:, None]


@triton.jit
def _slot_softmax(KP, s, ok3, b, px, py, t, spacing, Nk):
    """Distances of the points to their slots' keys and softmax_k(-t d): (BLOCK_G, PT, BLOCK_K)."""
    kbase = KP + (b * Nk)[:, None, None] * 2 + s.to(tl.int64) * 2
    kx = tl.div_rn(tl.load(kbase, mask=ok3, other=0.0), spacing)
    ky = tl.div_rn(tl.load(kbase + 1, mask=ok3, other=0.0), spacing)
    dx = tl.div_rn(px, spacing)[:, :, None] - kx
    dy = tl.div_rn(py, spacing)[:, :, None] - ky
    d = tl.sqrt_rn(dx * dx + dy * dy + 1e-6)
    z = tl.where(ok3, -t[:, None, None] * d, float("-inf"))
    m = tl.max(z, 2)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.where(ok3, tl.exp(z - m[:, :, None]), 0.0)
    ssum = tl.sum(e, 2)
    return dx, dy, d, e / tl.where(ssum > 0.0, ssum, 1.0)[:, :, None]


@triton.jit
def _tiles(OL, QP, G, H, Pt, Nq, stride_row, spacing, PT: tl.constexpr, BLOCK_G: tl.constexpr,
           K: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's groups: their points' tiles (``_points``), their (b, q) row and image, the
    (BLOCK_G, PT, BLOCK_K) mask and offsets of their slots in the (B, Nq, H, Pt, K) outputs."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = g < G
    p = tl.arange(0, PT)
    gp_ok, bq, h, col, lg, px, py = _points(OL, QP, g, g_ok, p, H, Pt, Nq, stride_row, spacing,
                                            PT)
    kk = tl.arange(0, BLOCK_K)
    ok3 = gp_ok[:, :, None] & (kk < K)[None, None, :]
    out = (g.to(tl.int64)[:, None] * Pt + p[None, :])[:, :, None] * K + kk[None, None, :]
    return g, g_ok, gp_ok, bq, bq // Nq, h, col, lg, px, py, kk, ok3, out


@triton.jit(do_not_specialize=_SIZES + ["cells", "gh", "gw"])
def _fwd_kernel(OL, QP, LT, KP, T, SEL, W, G, H, Pt, Nq, Nk, stride_row, cells, gh, gw, spacing,
                K: tl.constexpr, PT: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_K: tl.constexpr):
    g, g_ok, gp_ok, bq, b, h, col, lg, px, py, kk, ok3, out = _tiles(
        OL, QP, G, H, Pt, Nq, stride_row, spacing, PT, BLOCK_G, K, BLOCK_K)
    # the grid cell of each point, as lookup_neighbours (a NaN coordinate counts as 0)
    cx = tl.minimum(tl.maximum(_round_half_even(tl.where(px == px, px, 0.0)), 0.0),
                    (gw - 1).to(tl.float32))
    cy = tl.minimum(tl.maximum(_round_half_even(tl.where(py == py, py, 0.0)), 0.0),
                    (gh - 1).to(tl.float32))
    cell = cy.to(tl.int64) * gw + cx.to(tl.int64)
    s = tl.load(T + (b[:, None] * cells + cell)[:, :, None] * K + kk[None, None, :], mask=ok3,
                other=0)
    tl.store(SEL + out, s, mask=ok3)
    attn = _point_softmax(lg, gp_ok)
    t = tl.exp(tl.load(LT + h, mask=g_ok, other=0.0))
    _, _, _, sm = _slot_softmax(KP, s, ok3, b, px, py, t, spacing, Nk)
    tl.store(W + out, attn[:, :, None] * sm, mask=ok3)


@triton.jit(do_not_specialize=_SIZES)
def _bwd_kernel(GW, OL, QP, LT, KP, SEL, DOL, GT, G, H, Pt, Nq, Nk, stride_row, spacing,
                K: tl.constexpr, PT: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_K: tl.constexpr):
    g, g_ok, gp_ok, bq, b, h, col, lg, px, py, kk, ok3, out = _tiles(
        OL, QP, G, H, Pt, Nq, stride_row, spacing, PT, BLOCK_G, K, BLOCK_K)
    s = tl.load(SEL + out, mask=ok3, other=0)
    attn = _point_softmax(lg, gp_ok)
    t = tl.exp(tl.load(LT + h, mask=g_ok, other=0.0))
    dx, dy, d, sm = _slot_softmax(KP, s, ok3, b, px, py, t, spacing, Nk)
    gw = tl.load(GW + out, mask=ok3, other=0.0)
    g_attn = tl.sum(gw * sm, 2)  # (BLOCK_G, PT)
    gs = gw * attn[:, :, None]  # gradient of the slot softmax
    gz = sm * (gs - tl.sum(sm * gs, 2)[:, :, None])  # z = -t d
    gdd = tl.where(ok3, gz * -t[:, None, None] / d, 0.0)
    g_x = tl.sum(gdd * dx, 2)  # d point/spacing = d offset (see the module docstring)
    g_y = tl.sum(gdd * dy, 2)
    # d log_temp = t * d t, d t = -sum gz d; one partial per group
    g_t = -tl.sum(tl.sum(tl.where(ok3, gz * d, 0.0), 2), 1) * t
    tl.store(GT + g, g_t, mask=g_ok)
    g_lg = attn * (g_attn - tl.sum(attn * g_attn, 1)[:, None])  # the point softmax backward
    dbase = DOL + bq[:, None] * (H * Pt * 3)
    dt = DOL.dtype.element_ty
    tl.store(dbase + col * 2, g_x.to(dt), mask=gp_ok)
    tl.store(dbase + col * 2 + 1, g_y.to(dt), mask=gp_ok)
    tl.store(dbase + H * Pt * 2 + col, g_lg.to(dt), mask=gp_ok)


def _params(Pt: int, K: int) -> dict:
    pt = max(2, triton.next_power_of_2(Pt))
    block_k = max(2, triton.next_power_of_2(K))
    return dict(K=K, PT=pt, BLOCK_G=max(4, 512 // (pt * block_k)), BLOCK_K=block_k, num_warps=4,
                enable_fp_fusion=False)


def _rows(offlog: torch.Tensor, qpos: torch.Tensor, key_pos: torch.Tensor, heads: int,
          points: int) -> torch.Tensor:
    """offlog as the kernels read it: (B, Nq, H*Pt*3), unit column stride, evenly spaced rows
    (a column slice of a contiguous (B, Nq, C) projection is; anything else is copied)."""
    B, Nq, C3 = offlog.shape
    if C3 != heads * points * 3:
        raise ValueError(f"offlog must be (B, Nq, {heads * points * 3}) for {heads} heads of "
                         f"{points} points, got {tuple(offlog.shape)}")
    if qpos.shape != (B, Nq, 2) or key_pos.dim() != 3 or key_pos.shape[0] != B:
        raise ValueError(f"qpos {tuple(qpos.shape)} / key_pos {tuple(key_pos.shape)} do not "
                         f"match offlog {tuple(offlog.shape)}")
    if offlog.stride(-1) != 1 or offlog.stride(0) != Nq * offlog.stride(1):
        offlog = offlog.contiguous()
    return offlog


@torch.library.custom_op("affmae::deform_weights_fwd", mutates_args=())
def deform_weights_fwd(offlog: torch.Tensor, qpos: torch.Tensor, log_temp: torch.Tensor,
                       key_pos: torch.Tensor, table: torch.Tensor, gh: int, gw: int,
                       spacing: float, heads: int, points: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """offlog (B, Nq, H*Pt*3) any float dtype, qpos (B, Nq, 2) float32, log_temp (H,) float32,
    key_pos (B, Nk, 2) float32, table (B, gh*gw, K) int -> slots (B, Nq, H, Pt, K) in the
    table's dtype and w (B, Nq, H, Pt, K) float32."""
    offlog = _rows(offlog, qpos, key_pos, heads, points)
    B, Nq, _ = offlog.shape
    K = table.shape[-1]
    shape = (B, Nq, heads, points, K)
    sel = torch.empty(shape, dtype=table.dtype, device=offlog.device)
    w = torch.empty(shape, dtype=torch.float32, device=offlog.device)
    G = B * Nq * heads
    if G and K:
        p = _params(points, K)
        _fwd_kernel[(triton.cdiv(G, p["BLOCK_G"]),)](
            offlog, qpos.contiguous(), log_temp.contiguous(), key_pos.contiguous(),
            table.contiguous(), sel, w, G, heads, points, Nq, key_pos.shape[1], offlog.stride(1),
            gh * gw, gh, gw, float(spacing), **p)
    return sel, w


@deform_weights_fwd.register_fake
def _fwd_fake(offlog, qpos, log_temp, key_pos, table, gh, gw, spacing, heads, points):
    shape = (*offlog.shape[:2], heads, points, table.shape[-1])
    return table.new_empty(shape), offlog.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("affmae::deform_weights_bwd", mutates_args=())
def deform_weights_bwd(gw: torch.Tensor, offlog: torch.Tensor, qpos: torch.Tensor,
                       log_temp: torch.Tensor, key_pos: torch.Tensor, sel: torch.Tensor,
                       spacing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> d_offlog (B, Nq, H*Pt*3) contiguous in offlog's dtype, d_log_temp (H,) float32."""
    B, Nq, H, Pt, K = sel.shape
    offlog = _rows(offlog, qpos, key_pos, H, Pt)
    d_ol = torch.empty(offlog.shape, dtype=offlog.dtype, device=offlog.device)
    G = B * Nq * H
    g_t = torch.empty(G, dtype=torch.float32, device=offlog.device)
    if G and K:
        p = _params(Pt, K)
        _bwd_kernel[(triton.cdiv(G, p["BLOCK_G"]),)](
            gw.contiguous(), offlog, qpos.contiguous(), log_temp.contiguous(),
            key_pos.contiguous(), sel.contiguous(), d_ol, g_t, G, H, Pt, Nq, key_pos.shape[1],
            offlog.stride(1), float(spacing), **p)
    elif G:
        d_ol.zero_()
        g_t.zero_()
    return d_ol, g_t.view(B * Nq, H).sum(0)


@deform_weights_bwd.register_fake
def _bwd_fake(gw, offlog, qpos, log_temp, key_pos, sel, spacing):
    return offlog.new_empty(offlog.shape), log_temp.new_empty(log_temp.shape)
