"""Cluster attention, Triton kernels with several heads per program (prototype).

The kernels of ``kernel.py`` (read its module docstring first) run one program per (group,
batch * head): the union entry indices, membership bits, key positions and the five
relative-position features (dx, dy, r, dx/r, dy/r) of every key tile are identical across heads
and recomputed H times. Here one program takes HP heads (HP a power of two, a compile-time
constant; grid (nG, B * cdiv(H, HP)), heads h >= H masked):

- that index / position / feature work is done once per key tile and shared by the HP heads;
  each head's bias is then 5 FMAs of the shared features with its own weights (vectors of
  length HP broadcast as [HP, 1, 1]);
- q / k / v / dO tiles are [HP, rows, BLOCK_D] (for sh == D, the gather of one token's HP heads
  reads HP * D contiguous elements), and the products are batched 3-D ``tl.dot`` (batch = head);
- softmax state, row sums and gradient accumulators carry a leading HP dimension.

Same semantics, outputs, layouts and float32 numerics as ``kernel._fwd_kernel``,
``kernel._bwd_q_kernel`` and ``kernel._bwd_kv_kernel`` (blank key as the initial softmax state,
base-2 logits, n_valid and membership masks, row correction of P, per-program partial columns
of the parameter gradients, parameter-major). Only the rounding differs: the bias is summed as
w0 dx + w1 dy + w2 r + w3 (dx / r) + w4 (dy / r) + wb with dx / r and dy / r formed once
(``kernel._relpos_bias`` forms (w3 dx + w4 dy) / r per head).

``attention_forward_hp`` / ``attention_backward_hp`` take the arguments of
``kernel.attention_forward`` / ``kernel.attention_backward`` plus ``heads_per_program``.
Checked against the one-head kernels by ``scripts/heads_per_program_check.py`` (interpreter)
and timed by ``scripts/device/heads_per_program.py`` (GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from affmae.ops.cluster_attention.kernel import (BLOCK_K, _SIZES, _ensure, _structures, _tiles,
                                                 _token_views, _union_tile, check_inputs,
                                                 num_groups)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bias_weights_hp(W, WB, hh, h_ok):
    """Linear(5 -> H) weights of heads hh ([HP]) as float32 vectors, times log2(e); 0 for
    masked heads."""
    LOG2E = 1.4426950408889634
    w0 = tl.load(W + hh * 5, mask=h_ok, other=0.0).to(tl.float32) * LOG2E
    w1 = tl.load(W + hh * 5 + 1, mask=h_ok, other=0.0).to(tl.float32) * LOG2E
    w2 = tl.load(W + hh * 5 + 2, mask=h_ok, other=0.0).to(tl.float32) * LOG2E
    w3 = tl.load(W + hh * 5 + 3, mask=h_ok, other=0.0).to(tl.float32) * LOG2E
    w4 = tl.load(W + hh * 5 + 4, mask=h_ok, other=0.0).to(tl.float32) * LOG2E
    wb = tl.load(WB + hh, mask=h_ok, other=0.0).to(tl.float32) * LOG2E
    return w0, w1, w2, w3, w4, wb


@triton.jit
def _relpos_features(dx, dy):
    """The head-independent features of offsets (dx, dy): r, dx / r, dy / r (0 at r = 0)."""
    r2 = dx * dx + dy * dy
    inv_r = tl.where(r2 > 0, tl.rsqrt(tl.where(r2 > 0, r2, 1.0)), 0.0)  # one special-function op
    return r2 * inv_r, dx * inv_r, dy * inv_r


@triton.jit
def _bias_hp(dx, dy, rr, dxr, dyr, w0, w1, w2, w3, w4, wb):
    """Per-head bias [HP, R, C] of shared [R, C] features: 5 FMAs per head."""
    return (w0[:, None, None] * dx[None, :, :] + w1[:, None, None] * dy[None, :, :]
            + w2[:, None, None] * rr[None, :, :] + w3[:, None, None] * dxr[None, :, :]
            + w4[:, None, None] * dyr[None, :, :] + wb[:, None, None])


@triton.jit
def _heads(H, HP: tl.constexpr):
    """Batch element and the HP heads of this program (program axis 1 = b * cdiv(H, HP) + hg)."""
    HG = (H + HP - 1) // HP
    bhp = tl.program_id(1)
    b = (bhp // HG).to(tl.int64)
    hh = (bhp % HG) * HP + tl.arange(0, HP)
    return b, hh, hh < H, HG


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def _fwd_hp_kernel(
    Q, K, V, POS, GRP, W, WB, BK, BV, O, LSE,
    sb, sn, sh, ob, on, oh, spb, spn, sgb, slb, slh,
    H, M, n_valid, nG, CAP, scale,
    m: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
    HP: tl.constexpr,
):
    g = tl.program_id(0)
    b, hh, h_ok, _HG = _heads(H, HP)
    qk_scale = scale * 1.4426950408889634

    # 1. The G * m queries of group g for HP heads: [HP, BLOCK_Q, BLOCK_D].
    rq = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    r = rq // m
    q_row = (rq < G * m) & (g * G + r < M)
    d_ok = rd < D
    tq = g * (G * m) + rq
    h3 = hh[:, None, None]
    hd_ok = h_ok[:, None] & d_ok[None, :]  # [HP, BLOCK_D]
    hqd_ok = hd_ok[:, None, :] & q_row[None, :, None]
    q = tl.load(Q + b * sb + h3 * sh + tq[None, :, None] * sn + rd[None, None, :],
                mask=hqd_ok, other=0.0)
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights_hp(W, WB, hh, h_ok)

    # 2. Blank key/value as the initial softmax state.
    bk = tl.load(BK + hh[:, None] * D + rd[None, :], mask=hd_ok, other=0.0).to(tl.float32)
    bv = tl.load(BV + hh[:, None] * D + rd[None, :], mask=hd_ok, other=0.0).to(tl.float32)
    m_i = tl.sum(q.to(tl.float32) * bk[:, None, :], 2) * qk_scale  # [HP, BLOCK_Q]
    l_i = tl.full([HP, BLOCK_Q], 1.0, tl.float32)
    acc = tl.zeros([HP, BLOCK_Q, BLOCK_D], tl.float32) + bv[:, None, :]

    # 3. Stream over the union of the group's neighbourhoods; index, bits, positions and
    # features once per tile for all HP heads.
    u0 = tl.load(GRP + b * sgb + g)
    Kn = (tl.load(GRP + b * sgb + nG + g) - u0) * m
    for start in range(0, Kn, BLOCK_K):
        tk, t_ok, bits = _union_tile(GRP, sgb, b, u0, start, Kn, nG, CAP, m, BLOCK_K)
        pkx = tl.load(POS + b * spb + tk * spn, mask=t_ok, other=0.0)
        pky = tl.load(POS + b * spb + tk * spn + 1, mask=t_ok, other=0.0)
        hkd_ok = hd_ok[:, None, :] & t_ok[None, :, None]
        kv_off = b * sb + h3 * sh + tk[None, :, None] * sn + rd[None, None, :]
        k = tl.load(K + kv_off, mask=hkd_ok, other=0.0)
        v = tl.load(V + kv_off, mask=hkd_ok, other=0.0)
        s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T), 0, 2, 1), input_precision=DOT_PREC) * qk_scale
        dx = pkx[None, :] - pqx[:, None]
        dy = pky[None, :] - pqy[:, None]
        rr, dxr, dyr = _relpos_features(dx, dy)
        bias = _bias_hp(dx, dy, rr, dxr, dyr, w0, w1, w2, w3, w4, wb)
        ok = (((bits[None, :] >> r[:, None]) & 1) != 0) & (t_ok & (tk < n_valid))[None, :]
        s = tl.where(ok[None, :, :], s + bias, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 2))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(DOT_T), v.to(DOT_T), input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, :, None]
    tl.store(O + b * ob + h3 * oh + tq[None, :, None] * on + rd[None, None, :],
             out.to(O.dtype.element_ty), mask=hqd_ok)
    tl.store(LSE + b * slb + hh[:, None] * slh + tq[None, :], m_i + tl.log2(l_i),
             mask=h_ok[:, None] & q_row[None, :])


# ----------------------------------------------------------------------------------------------
# Backward, pass 1 (query-major: dq, row sums, parameter-gradient partial columns)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bwd_tile_hp(q, do, lse, pqx, pqy, q_row, r, K, V, POS, GRP, sgb, b, hh, hd_ok, u0, start,
                 Kn, nG, CAP, n_valid, sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd,
                 m: tl.constexpr, BLOCK_K: tl.constexpr, DOT_T: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """One key tile of a group's union for HP heads: P [HP, Q, K] (before the row correction),
    dP, the key tile, and the shared [Q, K] features the gradients need."""
    tk, t_ok, bits = _union_tile(GRP, sgb, b, u0, start, Kn, nG, CAP, m, BLOCK_K)
    pkx = tl.load(POS + b * spb + tk * spn, mask=t_ok, other=0.0)
    pky = tl.load(POS + b * spb + tk * spn + 1, mask=t_ok, other=0.0)
    hkd_ok = hd_ok[:, None, :] & t_ok[None, :, None]
    kv_off = b * sb + hh[:, None, None] * sh + tk[None, :, None] * sn + rd[None, None, :]
    k = tl.load(K + kv_off, mask=hkd_ok, other=0.0)
    v = tl.load(V + kv_off, mask=hkd_ok, other=0.0)
    dx = pkx[None, :] - pqx[:, None]
    dy = pky[None, :] - pqy[:, None]
    s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T), 0, 2, 1), input_precision=DOT_PREC) * qk_scale
    rr, dxr, dyr = _relpos_features(dx, dy)
    bias = _bias_hp(dx, dy, rr, dxr, dyr, w0, w1, w2, w3, w4, wb)
    ok = (((bits[None, :] >> r[:, None]) & 1) != 0) & (t_ok & (tk < n_valid))[None, :] & q_row[:, None]
    s = tl.where(ok[None, :, :], s + bias, -1.0e30)
    p = tl.exp2(s - lse[:, :, None])
    dp = tl.dot(do.to(DOT_T), tl.trans(v.to(DOT_T), 0, 2, 1), input_precision=DOT_PREC)
    return p, dp, k, dx, dy, rr, dxr, dyr


@triton.jit(do_not_specialize=_SIZES)
def _bwd_q_hp_kernel(
    Q, K, V, DO, POS, GRP, W, WB, BK, BV, LSE, ROWS, DQ, GP,
    sb, sn, sh, ob, on, oh, gb, gn, gh, spb, spn, sgb, slb, slh, rows_stride,
    H, M, n_valid, nG, CAP, scale,
    m: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
    HP: tl.constexpr,
):
    g = tl.program_id(0)
    b, hh, h_ok, HG = _heads(H, HP)
    qk_scale = scale * 1.4426950408889634

    rq = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    r = rq // m
    q_row = (rq < G * m) & (g * G + r < M)
    d_ok = rd < D
    tq = g * (G * m) + rq
    h3 = hh[:, None, None]
    hd_ok = h_ok[:, None] & d_ok[None, :]
    hqd_ok = hd_ok[:, None, :] & q_row[None, :, None]
    hq_ok = h_ok[:, None] & q_row[None, :]
    q = tl.load(Q + b * sb + h3 * sh + tq[None, :, None] * sn + rd[None, None, :],
                mask=hqd_ok, other=0.0)
    do = tl.load(DO + b * ob + h3 * oh + tq[None, :, None] * on + rd[None, None, :],
                 mask=hqd_ok, other=0.0)
    row_off = b * slb + hh[:, None] * slh + tq[None, :]  # [HP, BLOCK_Q]
    lse = tl.load(LSE + row_off, mask=hq_ok, other=0.0)
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights_hp(W, WB, hh, h_ok)

    # Row sums of P and P dP (blank included): the row correction and delta (see kernel.py).
    bk = tl.load(BK + hh[:, None] * D + rd[None, :], mask=hd_ok, other=0.0).to(tl.float32)
    bv = tl.load(BV + hh[:, None] * D + rd[None, :], mask=hd_ok, other=0.0).to(tl.float32)
    p_b = tl.exp2(tl.sum(q.to(tl.float32) * bk[:, None, :], 2) * qk_scale - lse)  # [HP, BLOCK_Q]
    p_b = tl.where(q_row[None, :], p_b, 0.0)
    dp_b = tl.sum(do.to(tl.float32) * bv[:, None, :], 2)
    p_sum = p_b
    pdp_sum = p_b * dp_b
    u0 = tl.load(GRP + b * sgb + g)
    Kn = (tl.load(GRP + b * sgb + nG + g) - u0) * m
    single = Kn <= BLOCK_K
    if not single:  # several key tiles: one extra sweep for the row sums
        for start in range(0, Kn, BLOCK_K):
            p, dp, k, dx, dy, rr, dxr, dyr = _bwd_tile_hp(
                q, do, lse, pqx, pqy, q_row, r, K, V, POS, GRP, sgb, b, hh, hd_ok, u0, start, Kn,
                nG, CAP, n_valid, sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd,
                m, BLOCK_K, DOT_T, DOT_PREC)
            p_sum += tl.sum(p, 2)
            pdp_sum += tl.sum(p * dp, 2)

    dq = tl.zeros([HP, BLOCK_Q, BLOCK_D], tl.float32)
    g0 = tl.zeros([HP, BLOCK_Q], tl.float32)
    g1 = tl.zeros([HP, BLOCK_Q], tl.float32)
    g2 = tl.zeros([HP, BLOCK_Q], tl.float32)
    g3 = tl.zeros([HP, BLOCK_Q], tl.float32)
    g4 = tl.zeros([HP, BLOCK_Q], tl.float32)
    g5 = tl.zeros([HP, BLOCK_Q], tl.float32)
    inv_sum = tl.where(q_row[None, :], 1.0 / tl.where(q_row[None, :], p_sum, 1.0), 0.0)
    delta = pdp_sum * inv_sum
    for start in range(0, Kn, BLOCK_K):
        p, dp, k, dx, dy, rr, dxr, dyr = _bwd_tile_hp(
            q, do, lse, pqx, pqy, q_row, r, K, V, POS, GRP, sgb, b, hh, hd_ok, u0, start, Kn,
            nG, CAP, n_valid, sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd,
            m, BLOCK_K, DOT_T, DOT_PREC)
        if single:  # the only tile: the row sums are complete after it
            p_sum += tl.sum(p, 2)
            pdp_sum += tl.sum(p * dp, 2)
            inv_sum = tl.where(q_row[None, :], 1.0 / tl.where(q_row[None, :], p_sum, 1.0), 0.0)
            delta = pdp_sum * inv_sum
        p = p * inv_sum[:, :, None]
        ds = p * (dp - delta[:, :, None])
        dq += tl.dot(ds.to(DOT_T), k.to(DOT_T), input_precision=DOT_PREC)
        g0 += tl.sum(ds * dx[None, :, :], 2)
        g1 += tl.sum(ds * dy[None, :, :], 2)
        g2 += tl.sum(ds * rr[None, :, :], 2)
        g3 += tl.sum(ds * dxr[None, :, :], 2)
        g4 += tl.sum(ds * dyr[None, :, :], 2)
        g5 += tl.sum(ds, 2)

    p_b = p_b * inv_sum
    ds_b = p_b * (dp_b - delta)
    dq += ds_b[:, :, None] * bk[:, None, :]
    tl.store(DQ + b * gb + h3 * gh + tq[None, :, None] * gn + rd[None, None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=hqd_ok)
    tl.store(ROWS + row_off, lse + tl.log2(tl.where(q_row[None, :], p_sum, 1.0)), mask=hq_ok)
    tl.store(ROWS + rows_stride + row_off, delta, mask=hq_ok)
    # GP: (6 H + 2 H D, B * nG), one column per (group, batch), parameter-major (as kernel.py);
    # this program writes its HP heads' rows.
    P = (tl.num_programs(1) // HG) * nG
    col = GP + (b * nG + g)
    tl.store(col + (hh * 5) * P, tl.sum(g0, 1), mask=h_ok)
    tl.store(col + (hh * 5 + 1) * P, tl.sum(g1, 1), mask=h_ok)
    tl.store(col + (hh * 5 + 2) * P, tl.sum(g2, 1), mask=h_ok)
    tl.store(col + (hh * 5 + 3) * P, tl.sum(g3, 1), mask=h_ok)
    tl.store(col + (hh * 5 + 4) * P, tl.sum(g4, 1), mask=h_ok)
    tl.store(col + (5 * H + hh) * P, tl.sum(g5, 1), mask=h_ok)
    tl.store(col + (6 * H + hh[:, None] * D + rd[None, :]) * P,
             tl.sum(ds_b[:, :, None] * q.to(tl.float32), 1) * scale, mask=hd_ok)
    tl.store(col + (6 * H + (H + hh[:, None]) * D + rd[None, :]) * P,
             tl.sum(p_b[:, :, None] * do.to(tl.float32), 1), mask=hd_ok)


# ----------------------------------------------------------------------------------------------
# Backward, pass 2 (key-major: dk, dv)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SIZES)
def _bwd_kv_hp_kernel(
    Q, K, V, DO, POS, GRP, W, WB, ROWS, DK, DV,
    sb, sn, sh, ob, on, oh, gb, gn, gh, spb, spn, sgb, slb, slh, rows_stride,
    H, M, n_valid, nG, CAP, scale,
    m: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
    HP: tl.constexpr,
):
    # Key-major: program (group of G key clusters, batch * HP heads) streams over the union of
    # the query clusters listing any of them; S, P, dP are [HP, keys, queries].
    g = tl.program_id(0)
    b, hh, h_ok, _HG = _heads(H, HP)
    qk_scale = scale * 1.4426950408889634

    rk = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    r = rk // m
    k_row = (rk < G * m) & (g * G + r < M)
    d_ok = rd < D
    tk = g * (G * m) + rk
    k_ok = k_row & (tk < n_valid)
    h3 = hh[:, None, None]
    hd_ok = h_ok[:, None] & d_ok[None, :]
    hkd_ok = hd_ok[:, None, :] & k_row[None, :, None]
    kv_off = b * sb + h3 * sh + tk[None, :, None] * sn + rd[None, None, :]
    k = tl.load(K + kv_off, mask=hkd_ok, other=0.0)
    v = tl.load(V + kv_off, mask=hkd_ok, other=0.0)
    pkx = tl.load(POS + b * spb + tk * spn, mask=k_row, other=0.0)
    pky = tl.load(POS + b * spb + tk * spn + 1, mask=k_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights_hp(W, WB, hh, h_ok)

    u0 = tl.load(GRP + b * sgb + g)
    n_in = (tl.load(GRP + b * sgb + nG + g) - u0) * m
    dk = tl.zeros([HP, BLOCK_Q, BLOCK_D], tl.float32)
    dv = tl.zeros([HP, BLOCK_Q, BLOCK_D], tl.float32)
    for start in range(0, n_in, BLOCK_K):
        tq, u_ok, bits = _union_tile(GRP, sgb, b, u0, start, n_in, nG, CAP, m, BLOCK_K)
        hud_ok = hd_ok[:, None, :] & u_ok[None, :, None]
        q = tl.load(Q + b * sb + h3 * sh + tq[None, :, None] * sn + rd[None, None, :],
                    mask=hud_ok, other=0.0)
        do = tl.load(DO + b * ob + h3 * oh + tq[None, :, None] * on + rd[None, None, :],
                     mask=hud_ok, other=0.0)
        row_off = b * slb + hh[:, None] * slh + tq[None, :]
        hu_ok = h_ok[:, None] & u_ok[None, :]
        lse = tl.load(ROWS + row_off, mask=hu_ok, other=0.0)
        delta = tl.load(ROWS + rows_stride + row_off, mask=hu_ok, other=0.0)
        pqx = tl.load(POS + b * spb + tq * spn, mask=u_ok, other=0.0)
        pqy = tl.load(POS + b * spb + tq * spn + 1, mask=u_ok, other=0.0)
        s = tl.dot(k.to(DOT_T), tl.trans(q.to(DOT_T), 0, 2, 1), input_precision=DOT_PREC) * qk_scale
        dx = pkx[:, None] - pqx[None, :]
        dy = pky[:, None] - pqy[None, :]
        rr, dxr, dyr = _relpos_features(dx, dy)
        bias = _bias_hp(dx, dy, rr, dxr, dyr, w0, w1, w2, w3, w4, wb)
        ok = (((bits[None, :] >> r[:, None]) & 1) != 0) & k_ok[:, None] & u_ok[None, :]
        s = tl.where(ok[None, :, :], s + bias, -1.0e30)
        p = tl.exp2(s - lse[:, None, :])
        dv += tl.dot(p.to(DOT_T), do.to(DOT_T), input_precision=DOT_PREC)
        dp = tl.dot(v.to(DOT_T), tl.trans(do.to(DOT_T), 0, 2, 1), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None, :])
        dk += tl.dot(ds.to(DOT_T), q.to(DOT_T), input_precision=DOT_PREC)

    tl.store(DK + b * gb + h3 * gh + tk[None, :, None] * gn + rd[None, None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=hkd_ok)
    tl.store(DV + b * gb + h3 * gh + tk[None, :, None] * gn + rd[None, None, :],
             dv.to(DV.dtype.element_ty), mask=hkd_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _hp_tiles(m, D, dtype, G, block_k, num_warps, HP: int) -> dict:
    if HP < 1 or HP & (HP - 1):
        raise ValueError(f"heads_per_program must be a power of two, got {HP}")
    tiles = _tiles(m, D, dtype, G, block_k, num_warps)
    if num_warps is None:  # one warp per 16-row tile per head, at most 4 (a guess; see the sweep)
        tiles["num_warps"] = min(4, tiles["num_warps"] * HP)
    return dict(tiles, HP=HP)


def attention_forward_hp(
    q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    grp: torch.Tensor | None = None, group: int | None = None, block_k: int = BLOCK_K,
    num_warps: int | None = None, heads_per_program: int = 2,
):
    """``kernel.attention_forward`` with ``heads_per_program`` heads per program. Returns out
    (B, N, H, D) in q's dtype and lse (B, H, N) float32, base 2."""
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M = nbr.shape[1]
    G, grp, _ = _structures(nbr, m, group, grp, None, need_t=False)
    nG = num_groups(M, G)
    HP = heads_per_program
    tiles = _hp_tiles(m, D, q.dtype, G, block_k, num_warps, HP)
    pos = _ensure(pos, torch.float32)  # (B, N, 2)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _fwd_hp_kernel[(nG, B * triton.cdiv(H, HP))](
        q, k, v, pos, grp, w, wb, bk, bv, out, lse,
        q.stride(0), q.stride(1), q.stride(2), N * H * D, H * D, D, N * 2, 2, grp.shape[1], H * N, N,
        H, M, n_valid, nG, (grp.shape[1] - 2 * nG) // 2, float(scale), **tiles,
    )
    return out, lse


def attention_backward_hp(
    do, q, k, v, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    grp: torch.Tensor | None = None, grp_t: torch.Tensor | None = None, group: int | None = None,
    block_k: int = BLOCK_K, num_warps: int | None = None, heads_per_program: int = 2,
    dqkv: torch.Tensor | None = None, passes: str = "qkv",
):
    """``kernel.attention_backward`` with ``heads_per_program`` heads per program. Returns dq,
    dk, dv (input dtype) and g (6 H + 2 H D,) float32 (``kernel.unpack_param_grads``)."""
    if passes not in ("qkv", "q"):
        raise ValueError(f"passes must be 'qkv' or 'q', got {passes!r}")
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M = nbr.shape[1]
    G, grp, grp_t = _structures(nbr, m, group, grp, grp_t, need_t=passes == "qkv")
    nG = num_groups(M, G)
    HP = heads_per_program
    tiles = _hp_tiles(m, D, q.dtype, G, block_k, num_warps, HP)
    do = _ensure(do, q.dtype)  # (B, N, H, D), the layout of out
    pos = _ensure(pos, torch.float32)  # (B, N, 2)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    dev = q.device
    if dqkv is None:
        dq, dk, dv = (torch.empty(B, N, H, D, device=dev, dtype=q.dtype) for _ in range(3))
    else:
        if tuple(dqkv.shape) != (B, N, 3, H, D) or dqkv.dtype != q.dtype or dqkv.stride(-1) != 1:
            raise ValueError(f"dqkv must be ({B}, {N}, 3, {H}, {D}) {q.dtype} with a unit stride on "
                             f"the head dim, got {tuple(dqkv.shape)} {dqkv.dtype} strides {dqkv.stride()}")
        dq, dk, dv = dqkv.unbind(2)
    strides = (*q.stride()[:3], N * H * D, H * D, D, *dq.stride()[:3], N * 2, 2)
    rows = torch.empty(2, B, H, N, device=dev, dtype=torch.float32)  # corrected lse, delta
    parts = torch.empty(6 * H + 2 * H * D, B * nG, device=dev, dtype=torch.float32)  # per (g, b)
    grid = (nG, B * triton.cdiv(H, HP))
    _bwd_q_hp_kernel[grid](
        q, k, v, do, pos, grp, w, wb, bk, bv, lse, rows, dq, parts,
        *strides, grp.shape[1], H * N, N, B * H * N,
        H, M, n_valid, nG, (grp.shape[1] - 2 * nG) // 2, float(scale), **tiles,
    )
    if passes == "qkv":
        _bwd_kv_hp_kernel[grid](
            q, k, v, do, pos, grp_t, w, wb, rows, dk, dv,
            *strides, grp_t.shape[1], H * N, N, B * H * N,
            H, M, n_valid, nG, (grp_t.shape[1] - 2 * nG) // 2, float(scale), **tiles,
        )
    return dq, dk, dv, parts.sum(-1)  # (6 H + 2 H D,)
