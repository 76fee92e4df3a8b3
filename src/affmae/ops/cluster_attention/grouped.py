"""Cluster attention, grouped Triton kernels: several neighbouring clusters per program.

The kernels of ``kernel.py`` run one program per (cluster, head): an 8-row query tile (padded to
16 rows for tensor cores) against the 64 gathered keys of its 8 neighbour clusters. Clusters are
ordered along a space-filling curve, so G consecutive clusters share most of their neighbours:
at 512 px, stage 1, the 8 x 8 = 64 neighbour slots of 8 consecutive clusters name about 22
distinct clusters (``affmae.bench.attention``'s inputs). These kernels take G clusters per
program: the query tile is their G * m queries, the key tiles stream over the *union* of their
neighbourhoods, and a bit per (union entry, query cluster) masks the logits of keys a query
cluster does not list. Each key is then gathered once per group instead of once per cluster
(2 x fewer key and value reads at G = 2, 3 x at G = 8), and at G = 2 with m = 8 the 16-row
tile has no padding rows. The price is logits computed for masked (query, key) pairs.

Same function as ``reference.py`` (and ``kernel.py``): softmax over [neighbour keys; blank key]
of q.k * scale + bias, float32 streaming softmax, the blank key/value as the initial state.

Group structure (``group_neighbourhood``), one int32 row per batch element, built once per
neighbourhood (a stage's blocks share it):
    [nG + 1 offsets][E union clusters][E masks]     E = M * Kc, nG = ceil(M / G)
Group g's union entries are off[g] .. off[g + 1]; entry e names a cluster and a mask whose bit i
says that row cluster i of the group lists it. Repeated neighbours (Kc > M, the global case) are
kept as repeated entries (the j-th repeat is its own entry), so every key counts as often as the
reference counts it. ``transpose=True`` gives the same for the key-major dK / dV pass: groups of
G key clusters, entries the query clusters listing them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from affmae.ops.cluster_attention.kernel import (
    _bias_weights, _ensure, _relpos_bias, _tiles, _token_views, check_inputs,
)

MAX_GROUP = 16  # the masks are int32 bit sets over the group's row clusters
_GSIZES = ["H", "M", "n_valid", "nG", "E"]  # never specialised


def group_neighbourhood(nbr: torch.Tensor, G: int, transpose: bool = False) -> torch.Tensor:
    """Union of the neighbourhoods of each G consecutive clusters, with membership masks.

    Args:
        nbr: (B, M, Kc) neighbour clusters of each (query) cluster.
        G: clusters per group, 1 .. ``MAX_GROUP``.
        transpose: group key clusters instead, listing the query clusters whose neighbourhood
            names them (for the key-major backward pass).
    Returns:
        (B, nG + 1 + 2 E) int32, E = M * Kc, nG = ceil(M / G): offsets, clusters, masks
        (module docstring). Deterministic; entries of a group ascend by cluster.
    """
    if not 1 <= G <= MAX_GROUP:
        raise ValueError(f"group size G={G} must be in [1, {MAX_GROUP}]")
    B, M, Kc = nbr.shape
    E, nG = M * Kc, -(-M // G)
    dev = nbr.device
    nb = nbr.to(torch.int64)
    # occurrence index of each entry's cluster among the earlier entries of its row
    same = nb[:, :, :, None] == nb[:, :, None, :]  # (B, M, Kc, Kc)
    occ = torch.tril(same, diagonal=-1).sum(-1)  # (B, M, Kc)
    row = torch.arange(M, device=dev).view(1, M, 1).expand(B, M, Kc)
    owner, listed = (nb, row) if transpose else (row, nb)  # group rows, union entries
    key = ((owner // G) * M + listed) * Kc + occ  # unique per (group, entry cluster, repeat)
    skey, order = torch.sort(key.reshape(B, E), dim=1)
    bit = torch.ones_like(skey) << (owner.reshape(B, E) % G).gather(1, order)
    new = torch.ones_like(skey, dtype=torch.bool)
    new[:, 1:] = skey[:, 1:] != skey[:, :-1]
    uid = new.cumsum(1) - 1  # union entry of each sorted entry
    masks = torch.zeros_like(skey).scatter_add_(1, uid, bit)  # distinct bits: a sum is an OR
    clusters = torch.zeros_like(skey).scatter_(1, uid, (skey // Kc) % M)
    groups = torch.full_like(skey, nG).scatter_(1, uid, skey // (M * Kc))  # tail: nG
    bounds = torch.arange(nG + 1, device=dev).expand(B, nG + 1).contiguous()
    off = torch.searchsorted(groups, bounds)
    return torch.cat([off, clusters, masks], dim=1).to(torch.int32)


def check_groups(grp: torch.Tensor, B: int, M: int, Kc: int, G: int, what: str) -> torch.Tensor:
    nG, E = -(-M // G), M * Kc
    if tuple(grp.shape) != (B, nG + 1 + 2 * E) or grp.dtype != torch.int32:
        raise ValueError(f"{what} must be ({B}, {nG + 1 + 2 * E}) int32 (group_neighbourhood with "
                         f"G={G}), got {tuple(grp.shape)} {grp.dtype}")
    return _ensure(grp)


# ----------------------------------------------------------------------------------------------
# Kernels (conventions of kernel.py: base-2 logits, q / k / v strides (sb, sn, sh), out / dO
# (ob, on, oh), dq / dk / dv (gb, gn, gh), unit stride on the head dim).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _union_tile(GRP, sgb, b, u0, start, Kn, nG, E, m: tl.constexpr, BLOCK_K: tl.constexpr):
    """Flat index t = start .. start + BLOCK_K over a group's union entries (m tokens each):
    token index, in-range flag and membership mask of each column."""
    t = start + tl.arange(0, BLOCK_K)
    t_ok = t < Kn
    e = GRP + b * sgb + nG + 1 + u0 + t // m
    cl = tl.load(e, mask=t_ok, other=0)
    bits = tl.load(e + E, mask=t_ok, other=0)
    return cl * m + t % m, t_ok, bits


@triton.jit(do_not_specialize=_GSIZES)
def _fwd_group_kernel(
    Q, K, V, POS, GRP, W, WB, BK, BV, O, LSE,
    sb, sn, sh, ob, on, oh, spb, spn, sgb, slb, slh,
    H, M, n_valid, nG, E, scale,
    m: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    qk_scale = scale * 1.4426950408889634

    # 1. The G * m queries of group g (row cluster r = row // m).
    rq = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    r = rq // m
    q_row = (rq < G * m) & (g * G + r < M)
    d_ok = rd < D
    tq = g * (G * m) + rq
    q = tl.load(Q + b * sb + h * sh + tq[:, None] * sn + rd[None, :],
                mask=q_row[:, None] & d_ok[None, :], other=0.0)
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # 2. Blank key/value as the initial softmax state.
    bk = tl.load(BK + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    bv = tl.load(BV + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    m_i = tl.sum(q.to(tl.float32) * bk[None, :], 1) * qk_scale
    l_i = tl.full([BLOCK_Q], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32) + bv[None, :]

    # 3. Stream over the union of the group's neighbourhoods.
    u0 = tl.load(GRP + b * sgb + g)
    Kn = (tl.load(GRP + b * sgb + g + 1) - u0) * m
    for start in range(0, Kn, BLOCK_K):
        tk, t_ok, bits = _union_tile(GRP, sgb, b, u0, start, Kn, nG, E, m, BLOCK_K)
        pkx = tl.load(POS + b * spb + tk * spn, mask=t_ok, other=0.0)
        pky = tl.load(POS + b * spb + tk * spn + 1, mask=t_ok, other=0.0)
        kd_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
        v = tl.load(V + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
        s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC) * qk_scale
        bias, _r, _ir = _relpos_bias(pkx[None, :] - pqx[:, None], pky[None, :] - pqy[:, None],
                                     w0, w1, w2, w3, w4, wb)
        ok = (((bits[None, :] >> r[:, None]) & 1) != 0) & (t_ok & (tk < n_valid))[None, :]
        s = tl.where(ok, s + bias, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), v.to(DOT_T), input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + b * ob + h * oh + tq[:, None] * on + rd[None, :],
             out.to(O.dtype.element_ty), mask=q_row[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + tq, m_i + tl.log2(l_i), mask=q_row)


@triton.jit
def _bwd_group_tile(q, do, lse, pqx, pqy, q_row, r, K, V, POS, GRP, sgb, b, h, u0, start, Kn,
                    nG, E, n_valid, sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd,
                    d_ok, m: tl.constexpr, BLOCK_K: tl.constexpr, DOT_T: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """One key tile of a group's union: P (before the row correction), dP, and what the
    gradients need."""
    tk, t_ok, bits = _union_tile(GRP, sgb, b, u0, start, Kn, nG, E, m, BLOCK_K)
    pkx = tl.load(POS + b * spb + tk * spn, mask=t_ok, other=0.0)
    pky = tl.load(POS + b * spb + tk * spn + 1, mask=t_ok, other=0.0)
    kd_ok = t_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
    v = tl.load(V + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
    dx = pkx[None, :] - pqx[:, None]
    dy = pky[None, :] - pqy[:, None]
    s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC) * qk_scale
    bias, rr, inv_r = _relpos_bias(dx, dy, w0, w1, w2, w3, w4, wb)
    ok = (((bits[None, :] >> r[:, None]) & 1) != 0) & (t_ok & (tk < n_valid))[None, :] & q_row[:, None]
    s = tl.where(ok, s + bias, -1.0e30)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do.to(DOT_T), tl.trans(v.to(DOT_T)), input_precision=DOT_PREC)
    return p, dp, k, dx, dy, rr, inv_r


@triton.jit(do_not_specialize=_GSIZES)
def _bwd_q_group_kernel(
    Q, K, V, DO, POS, GRP, W, WB, BK, BV, LSE, ROWS, DQ, GP,
    sb, sn, sh, ob, on, oh, gb, gn, gh, spb, spn, sgb, slb, slh, rows_stride,
    H, M, n_valid, nG, E, scale,
    m: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    qk_scale = scale * 1.4426950408889634

    rq = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    r = rq // m
    q_row = (rq < G * m) & (g * G + r < M)
    d_ok = rd < D
    qd_ok = q_row[:, None] & d_ok[None, :]
    tq = g * (G * m) + rq
    q = tl.load(Q + b * sb + h * sh + tq[:, None] * sn + rd[None, :], mask=qd_ok, other=0.0)
    do = tl.load(DO + b * ob + h * oh + tq[:, None] * on + rd[None, :], mask=qd_ok, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + tq, mask=q_row, other=0.0)
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # Row sums of P and P dP (blank included): the row correction and delta (see kernel.py).
    bk = tl.load(BK + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    bv = tl.load(BV + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    p_b = tl.exp2(tl.sum(q.to(tl.float32) * bk[None, :], 1) * qk_scale - lse)
    p_b = tl.where(q_row, p_b, 0.0)
    dp_b = tl.sum(do.to(tl.float32) * bv[None, :], 1)
    p_sum = p_b
    pdp_sum = p_b * dp_b
    u0 = tl.load(GRP + b * sgb + g)
    Kn = (tl.load(GRP + b * sgb + g + 1) - u0) * m
    single = Kn <= BLOCK_K
    if not single:  # several key tiles: one extra sweep for the row sums
        for start in range(0, Kn, BLOCK_K):
            p, dp, k, dx, dy, rr, inv_r = _bwd_group_tile(
                q, do, lse, pqx, pqy, q_row, r, K, V, POS, GRP, sgb, b, h, u0, start, Kn, nG, E,
                n_valid, sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd, d_ok,
                m, BLOCK_K, DOT_T, DOT_PREC)
            p_sum += tl.sum(p, 1)
            pdp_sum += tl.sum(p * dp, 1)

    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    g0 = tl.zeros([BLOCK_Q], tl.float32)
    g1 = tl.zeros([BLOCK_Q], tl.float32)
    g2 = tl.zeros([BLOCK_Q], tl.float32)
    g3 = tl.zeros([BLOCK_Q], tl.float32)
    g4 = tl.zeros([BLOCK_Q], tl.float32)
    g5 = tl.zeros([BLOCK_Q], tl.float32)
    inv_sum = tl.where(q_row, 1.0 / tl.where(q_row, p_sum, 1.0), 0.0)
    delta = pdp_sum * inv_sum
    for start in range(0, Kn, BLOCK_K):
        p, dp, k, dx, dy, rr, inv_r = _bwd_group_tile(
            q, do, lse, pqx, pqy, q_row, r, K, V, POS, GRP, sgb, b, h, u0, start, Kn, nG, E,
            n_valid, sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd, d_ok,
            m, BLOCK_K, DOT_T, DOT_PREC)
        if single:  # the only tile: the row sums are complete after it
            p_sum += tl.sum(p, 1)
            pdp_sum += tl.sum(p * dp, 1)
            inv_sum = tl.where(q_row, 1.0 / tl.where(q_row, p_sum, 1.0), 0.0)
            delta = pdp_sum * inv_sum
        p = p * inv_sum[:, None]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT_T), k.to(DOT_T), input_precision=DOT_PREC)
        g0 += tl.sum(ds * dx, 1)
        g1 += tl.sum(ds * dy, 1)
        g2 += tl.sum(ds * rr, 1)
        g3 += tl.sum(ds * dx * inv_r, 1)
        g4 += tl.sum(ds * dy * inv_r, 1)
        g5 += tl.sum(ds, 1)

    p_b = p_b * inv_sum
    ds_b = p_b * (dp_b - delta)
    dq += ds_b[:, None] * bk[None, :]
    tl.store(DQ + b * gb + h * gh + tq[:, None] * gn + rd[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_ok)
    tl.store(ROWS + b * slb + h * slh + tq, lse + tl.log2(tl.where(q_row, p_sum, 1.0)), mask=q_row)
    tl.store(ROWS + rows_stride + b * slb + h * slh + tq, delta, mask=q_row)
    # GP: (6 H + 2 H D, B * nG), one column per program, parameter-major (as kernel.py).
    P = (tl.num_programs(1) // H) * nG
    col = GP + (b * nG + g)
    tl.store(col + (h * 5) * P, tl.sum(g0, 0))
    tl.store(col + (h * 5 + 1) * P, tl.sum(g1, 0))
    tl.store(col + (h * 5 + 2) * P, tl.sum(g2, 0))
    tl.store(col + (h * 5 + 3) * P, tl.sum(g3, 0))
    tl.store(col + (h * 5 + 4) * P, tl.sum(g4, 0))
    tl.store(col + (5 * H + h) * P, tl.sum(g5, 0))
    tl.store(col + (6 * H + h * D + rd) * P,
             tl.sum(ds_b[:, None] * q.to(tl.float32), 0) * scale, mask=d_ok)
    tl.store(col + (6 * H + (H + h) * D + rd) * P,
             tl.sum(p_b[:, None] * do.to(tl.float32), 0), mask=d_ok)


@triton.jit(do_not_specialize=_GSIZES)
def _bwd_kv_group_kernel(
    Q, K, V, DO, POS, GRP, W, WB, ROWS, DK, DV,
    sb, sn, sh, ob, on, oh, gb, gn, gh, spb, spn, sgb, slb, slh, rows_stride,
    H, M, n_valid, nG, E, scale,
    m: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Key-major: program (group of G key clusters, batch * head) streams over the union of the
    # query clusters listing any of them (transposed group structure); S, P, dP are keys x queries.
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    qk_scale = scale * 1.4426950408889634

    rk = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    r = rk // m
    k_row = (rk < G * m) & (g * G + r < M)
    d_ok = rd < D
    kd_ok = k_row[:, None] & d_ok[None, :]
    tk = g * (G * m) + rk
    k_ok = k_row & (tk < n_valid)
    k = tl.load(K + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
    v = tl.load(V + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
    pkx = tl.load(POS + b * spb + tk * spn, mask=k_row, other=0.0)
    pky = tl.load(POS + b * spb + tk * spn + 1, mask=k_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    u0 = tl.load(GRP + b * sgb + g)
    n_in = (tl.load(GRP + b * sgb + g + 1) - u0) * m
    dk = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for start in range(0, n_in, BLOCK_K):
        tq, u_ok, bits = _union_tile(GRP, sgb, b, u0, start, n_in, nG, E, m, BLOCK_K)
        qd = u_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sb + h * sh + tq[:, None] * sn + rd[None, :], mask=qd, other=0.0)
        do = tl.load(DO + b * ob + h * oh + tq[:, None] * on + rd[None, :], mask=qd, other=0.0)
        lse = tl.load(ROWS + b * slb + h * slh + tq, mask=u_ok, other=0.0)
        delta = tl.load(ROWS + rows_stride + b * slb + h * slh + tq, mask=u_ok, other=0.0)
        pqx = tl.load(POS + b * spb + tq * spn, mask=u_ok, other=0.0)
        pqy = tl.load(POS + b * spb + tq * spn + 1, mask=u_ok, other=0.0)
        s = tl.dot(k.to(DOT_T), tl.trans(q.to(DOT_T)), input_precision=DOT_PREC) * qk_scale
        bias, _r, _ir = _relpos_bias(pkx[:, None] - pqx[None, :], pky[:, None] - pqy[None, :],
                                     w0, w1, w2, w3, w4, wb)
        ok = (((bits[None, :] >> r[:, None]) & 1) != 0) & k_ok[:, None] & u_ok[None, :]
        s = tl.where(ok, s + bias, -1.0e30)
        p = tl.exp2(s - lse[None, :])
        dv += tl.dot(p.to(DOT_T), do.to(DOT_T), input_precision=DOT_PREC)
        dp = tl.dot(v.to(DOT_T), tl.trans(do.to(DOT_T)), input_precision=DOT_PREC)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(DOT_T), q.to(DOT_T), input_precision=DOT_PREC)

    tl.store(DK + b * gb + h * gh + tk[:, None] * gn + rd[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV + b * gb + h * gh + tk[:, None] * gn + rd[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _group_tiles(m: int, D: int, dtype, G: int, block_k: int, num_warps: int | None) -> dict:
    t = _tiles(m, D, dtype)
    t["BLOCK_Q"] = max(16, triton.next_power_of_2(G * m))
    t["BLOCK_K"] = block_k
    t["num_warps"] = num_warps or max(1, t["BLOCK_Q"] // 16) * (1 if D <= 64 else 2)
    return dict(t, G=G)


def grouped_forward(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
                    G: int = 2, grp: torch.Tensor | None = None, block_k: int = 64,
                    num_warps: int | None = None):
    """Forward over groups of G clusters. Returns out (B, N, H, D) and lse (B, H, N) float32
    (base 2), as ``kernel.attention_forward``. ``grp``: ``group_neighbourhood(nbr, G)`` if the
    caller has it."""
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    grp = group_neighbourhood(nbr, G) if grp is None else check_groups(grp, B, M, Kc, G, "grp")
    nG, E = -(-M // G), M * Kc
    pos = _ensure(pos, torch.float32)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _fwd_group_kernel[(nG, B * H)](
        q, k, v, pos, grp, w, wb, bk, bv, out, lse,
        q.stride(0), q.stride(1), q.stride(2), N * H * D, H * D, D, N * 2, 2, grp.shape[1], H * N, N,
        H, M, n_valid, nG, E, float(scale),
        **_group_tiles(m, D, q.dtype, G, block_k, num_warps),
    )
    return out, lse


def grouped_backward(do, q, k, v, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v,
                     scale, G: int = 2, grp: torch.Tensor | None = None,
                     grp_t: torch.Tensor | None = None, block_k: int = 64,
                     num_warps: int | None = None, dqkv: torch.Tensor | None = None):
    """Backward over groups of G clusters: dq, dk, dv and the packed (6 H + 2 H D,) float32
    parameter gradients, as ``kernel.attention_backward``. ``grp`` / ``grp_t``:
    ``group_neighbourhood(nbr, G)`` and ``group_neighbourhood(nbr, G, transpose=True)``."""
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    grp = group_neighbourhood(nbr, G) if grp is None else check_groups(grp, B, M, Kc, G, "grp")
    if grp_t is None:
        grp_t = group_neighbourhood(nbr, G, transpose=True)
    else:
        grp_t = check_groups(grp_t, B, M, Kc, G, "grp_t")
    nG, E = -(-M // G), M * Kc
    do = _ensure(do, q.dtype)
    pos = _ensure(pos, torch.float32)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    dev = q.device
    tiles = _group_tiles(m, D, q.dtype, G, block_k, num_warps)
    if dqkv is None:
        dq = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
        dk = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
        dv = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
    else:
        dq, dk, dv = dqkv.unbind(2)
    strides = (*q.stride()[:3], N * H * D, H * D, D, *dq.stride()[:3], N * 2, 2, grp.shape[1])
    rows = torch.empty(2, B, H, N, device=dev, dtype=torch.float32)
    parts = torch.empty(6 * H + 2 * H * D, B * nG, device=dev, dtype=torch.float32)
    sizes = (H, M, n_valid, nG, E, float(scale))
    _bwd_q_group_kernel[(nG, B * H)](
        q, k, v, do, pos, grp, w, wb, bk, bv, lse, rows, dq, parts,
        *strides, H * N, N, B * H * N, *sizes, **tiles,
    )
    _bwd_kv_group_kernel[(nG, B * H)](
        q, k, v, do, pos, grp_t, w, wb, rows, dk, dv,
        *strides, H * N, N, B * H * N, *sizes, **tiles,
    )
    return dq, dk, dv, parts.sum(-1)
