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
_GSIZES = ["H", "M", "n_valid", "nG", "CAP"]  # never specialised
TRANSPOSE_METHODS = ("auto", "count", "sort")
#: "auto" sorts from this many entries (M * Kc) per image up (as ``kernel.SORT_FROM_ENTRIES``).
SORT_FROM_ENTRIES = 2048


def num_groups(M: int, G: int) -> int:
    return -(-M // G)


def groups_width(M: int, Kc: int, G: int, transpose: bool = False) -> int:
    """Row length of a group structure: [start nG][end nG][clusters CAP][masks CAP]."""
    nG = num_groups(M, G)
    return 2 * nG + 2 * (M * Kc if transpose else nG * G * Kc)


def group_neighbourhood_ref(nbr: torch.Tensor, G: int, transpose: bool = False) -> list:
    """Plain-Python specification of ``group_neighbourhood``: per batch element, per group, the
    set of (cluster, mask) union entries (for tests; any order within a group)."""
    B, M, Kc = nbr.shape
    out = []
    for b in range(B):
        groups = [dict() for _ in range(num_groups(M, G))]
        for i in range(M):
            seen: dict[int, int] = {}
            for j in range(Kc):
                v = int(nbr[b, i, j])
                o = seen.get(v, 0)
                seen[v] = o + 1
                owner, listed = (v, i) if transpose else (i, v)
                d = groups[owner // G]
                d[(listed, o)] = d.get((listed, o), 0) | (1 << (owner % G))
        out.append([sorted((c, mk) for (c, _o), mk in d.items()) for d in groups])
    return out


def group_entries(grp: torch.Tensor, M: int, Kc: int, G: int, transpose: bool = False) -> list:
    """The union entries of a group structure in ``group_neighbourhood_ref``'s form."""
    nG = num_groups(M, G)
    cap = (grp.shape[1] - 2 * nG) // 2
    g = grp.cpu().tolist()
    return [[sorted(zip(row[2 * nG + row[i]: 2 * nG + row[nG + i]],
                        row[2 * nG + cap + row[i]: 2 * nG + cap + row[nG + i]])) for i in range(nG)]
            for row in g]


@triton.jit
def _groups_kernel(NBR, OUT, M, Kc, nG, CAP, G: tl.constexpr, GP: tl.constexpr, KCP: tl.constexpr,
                   GB: tl.constexpr):
    """Program (GB groups, batch element b): each group's union of its G rows' neighbour lists,
    as (cluster, mask) entries at the group's fixed slots g * G * Kc .. (first occurrences in
    row order; a cluster listed twice in a row is two entries, see the module docstring)."""
    b = tl.program_id(1).to(tl.int64)
    GK: tl.constexpr = GP * KCP  # GP, KCP: G and Kc rounded up to powers of two
    ga = tl.program_id(0) * GB + tl.arange(0, GB)  # (GB,) groups
    a = tl.arange(0, GK)  # slot a = row r of the group, column j
    r = a // KCP
    j = a % KCP
    row = ga[:, None] * G + r[None, :]  # (GB, GK)
    ok = (j[None, :] < Kc) & (r[None, :] < G) & (row < M) & (ga[:, None] < nG)
    v = tl.load(NBR + b * M * Kc + row * Kc + j[None, :], mask=ok, other=-1).to(tl.int32)
    # occurrence index of v among the earlier columns of its row
    earlier = (r[:, None] == r[None, :]) & (j[None, :] < j[:, None])  # (GK, GK): [a, a']
    same = (v[:, :, None] == v[:, None, :]) & earlier[None, :, :] & ok[:, None, :]
    key = tl.where(ok, v * Kc + tl.sum(same.to(tl.int32), 2), -1)  # (cluster, repeat)
    eq = (key[:, :, None] == key[:, None, :]) & ok[:, :, None] & ok[:, None, :]  # (GB, GK, GK)
    first = ok & (tl.sum((eq & (a[None, :] < a[:, None])[None, :, :]).to(tl.int32), 2) == 0)
    bit = tl.full([GK], 1, tl.int32) << r
    mask = tl.sum(tl.where(eq, bit[None, None, :], 0), 2)  # rows listing it: distinct bits
    pos = tl.cumsum(first.to(tl.int32), 1) - 1
    base = OUT + b * (2 * nG + 2 * CAP)
    start = ga * (G * Kc)
    tl.store(base + ga, start, mask=ga < nG)
    tl.store(base + nG + ga, start + tl.sum(first.to(tl.int32), 1), mask=ga < nG)
    dest = base + 2 * nG + start[:, None] + pos
    tl.store(dest, v, mask=first)
    tl.store(dest + CAP, mask, mask=first)


@triton.jit
def _key_groups_kernel(NBR, VAL, TMASK, M, Kc, nG, G: tl.constexpr, KCP: tl.constexpr,
                       RB: tl.constexpr):
    """Program (RB rows, batch element b), for the key-major structure: per entry (row i,
    column j) listing cluster v, VAL = its key group v // G if it is the first entry of row i
    with that key group and repeat index, else nG (no entry); TMASK = the bits v' % G of all
    entries of row i with that key group and repeat index."""
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * RB + tl.arange(0, RB)  # (RB,) rows
    j = tl.arange(0, KCP)
    ok = (i[:, None] < M) & (j[None, :] < Kc)  # (RB, KCP)
    off = b * M * Kc + i[:, None] * Kc + j[None, :]
    v = tl.load(NBR + off, mask=ok, other=-1).to(tl.int32)
    before = j[None, :] < j[:, None]  # (KCP, KCP): [j, j']
    both = ok[:, :, None] & ok[:, None, :]
    occ = tl.sum(((v[:, :, None] == v[:, None, :]) & before[None, :, :] & both).to(tl.int32), 2)
    key = (v // G) * Kc + occ
    eq = (key[:, :, None] == key[:, None, :]) & both
    first = ok & (tl.sum((eq & before[None, :, :]).to(tl.int32), 2) == 0)
    bits = tl.sum(tl.where(eq, (tl.full([RB, KCP], 1, tl.int32) << (v % G))[:, None, :], 0), 2)
    tl.store(VAL + off, tl.where(first, v // G, nG), mask=ok)
    tl.store(TMASK + off, bits, mask=ok)


@triton.jit
def _csr_groups_kernel(VAL, TMASK, OUT, E, Kc, nG, CAP, KB: tl.constexpr, CHUNK: tl.constexpr):
    """Program (KB key groups, batch element b): the entries with VAL == group, in entry order,
    by counting (``kernel._transpose_kernel`` with groups for clusters and a sentinel nG):
    start / end of each group, the listing row (entry // Kc) and its mask."""
    b = tl.program_id(1).to(tl.int64)
    kc = tl.program_id(0) * KB + tl.arange(0, KB)  # (KB,) key groups; nG itself for the end
    base = OUT + b * (2 * nG + 2 * CAP)
    less = tl.zeros([KB], tl.int32)
    for e0 in range(0, E, CHUNK):
        e = e0 + tl.arange(0, CHUNK)
        val = tl.load(VAL + b * E + e, mask=e < E, other=nG)
        less += tl.sum((val[:, None] < kc[None, :]).to(tl.int32), 0)
    tl.store(base + kc, less, mask=kc < nG)
    tl.store(base + nG + kc - 1, less, mask=(kc >= 1) & (kc <= nG))
    seen = less
    for e0 in range(0, E, CHUNK):
        e = e0 + tl.arange(0, CHUNK)
        val = tl.load(VAL + b * E + e, mask=e < E, other=nG)
        match = ((val[:, None] == kc[None, :]) & (kc < nG)[None, :]).to(tl.int32)  # (CHUNK, KB)
        dest = tl.sum(match * (tl.cumsum(match, 0) - match + seen[None, :]), 1)
        hit = tl.sum(match, 1) > 0
        tl.store(base + 2 * nG + dest, e // Kc, mask=hit)
        tl.store(base + 2 * nG + CAP + dest, tl.load(TMASK + b * E + e, mask=hit, other=0), mask=hit)
        seen += tl.sum(match, 0)


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def group_neighbourhood(nbr: torch.Tensor, G: int, transpose: bool = False,
                        method: str = "auto") -> torch.Tensor:
    """Union of the neighbourhoods of each G consecutive clusters, with membership masks.

    Args:
        nbr: (B, M, Kc) neighbour clusters of each (query) cluster.
        G: clusters per group, 1 .. ``MAX_GROUP``.
        transpose: group key clusters instead, listing the query clusters whose neighbourhood
            names them (for the key-major backward pass).
        method: for ``transpose``, how the entries are grouped: "count" (one Triton launch
            counting over all entries, fast for small stages), "sort" (a stable ``torch.sort``,
            a few launches, any size) or "auto" ("sort" from ``SORT_FROM_ENTRIES`` entries).
    Returns:
        (B, ``groups_width(M, Kc, G, transpose)``) int32: [start (nG)][end (nG)][clusters
        (CAP)][masks (CAP)]; group g's entries are start[g] .. end[g]. Deterministic.
    """
    if not 1 <= G <= MAX_GROUP:
        raise ValueError(f"group size G={G} must be in [1, {MAX_GROUP}]")
    if method not in TRANSPOSE_METHODS:
        raise ValueError(f"method must be one of {TRANSPOSE_METHODS}, got {method!r}")
    nbr = _ensure(nbr)
    B, M, Kc = nbr.shape
    nG, E = num_groups(M, G), M * Kc
    KCP, GP = triton.next_power_of_2(Kc), triton.next_power_of_2(G)
    out = torch.empty(B, groups_width(M, Kc, G, transpose), device=nbr.device, dtype=torch.int32)
    if not transpose:
        GB = _pow2_at_most(2048 // (GP * KCP) ** 2)  # groups per program: (GB, GK, GK) tiles
        _groups_kernel[(triton.cdiv(nG, GB), B)](nbr, out, M, Kc, nG, nG * G * Kc, G=G, GP=GP, KCP=KCP,
                                                 GB=GB)
        return out
    val = torch.empty(B, E, device=nbr.device, dtype=torch.int32)
    tmask = torch.empty_like(val)
    RB = _pow2_at_most(1024 // KCP ** 2)
    _key_groups_kernel[(triton.cdiv(M, RB), B)](nbr, val, tmask, M, Kc, nG, G=G, KCP=KCP, RB=RB)
    if method == "auto":
        method = "sort" if E >= SORT_FROM_ENTRIES else "count"
    if method == "count":
        KB = 16
        _csr_groups_kernel[(triton.cdiv(nG + 1, KB), B)](val, tmask, out, E, Kc, nG, E, KB=KB,
                                                          CHUNK=512, num_warps=8)
        return out
    sval, order = torch.sort(val, dim=1, stable=True)
    bounds = torch.arange(nG + 1, device=nbr.device, dtype=torch.int32).expand(B, nG + 1)
    off = torch.searchsorted(sval, bounds.contiguous()).to(torch.int32)  # (B, nG + 1)
    return torch.cat([off[:, :-1], off[:, 1:], torch.div(order, Kc, rounding_mode="floor").to(torch.int32),
                      tmask.gather(1, order)], dim=1)


def check_groups(grp: torch.Tensor, B: int, M: int, Kc: int, G: int, transpose: bool,
                 what: str) -> torch.Tensor:
    width = groups_width(M, Kc, G, transpose)
    if tuple(grp.shape) != (B, width) or grp.dtype != torch.int32:
        raise ValueError(f"{what} must be ({B}, {width}) int32 (group_neighbourhood with G={G}, "
                         f"transpose={transpose}), got {tuple(grp.shape)} {grp.dtype}")
    return _ensure(grp)


# ----------------------------------------------------------------------------------------------
# Kernels (conventions of kernel.py: base-2 logits, q / k / v strides (sb, sn, sh), out / dO
# (ob, on, oh), dq / dk / dv (gb, gn, gh), unit stride on the head dim).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _union_tile(GRP, sgb, b, u0, start, Kn, nG, CAP, m: tl.constexpr, BLOCK_K: tl.constexpr):
    """Flat index t = start .. start + BLOCK_K over a group's union entries (m tokens each):
    token index, in-range flag and membership mask of each column."""
    t = start + tl.arange(0, BLOCK_K)
    t_ok = t < Kn
    e = GRP + b * sgb + 2 * nG + u0 + t // m
    cl = tl.load(e, mask=t_ok, other=0)
    bits = tl.load(e + CAP, mask=t_ok, other=0)
    return cl * m + t % m, t_ok, bits


@triton.jit(do_not_specialize=_GSIZES)
def _fwd_group_kernel(
    Q, K, V, POS, GRP, W, WB, BK, BV, O, LSE,
    sb, sn, sh, ob, on, oh, spb, spn, sgb, slb, slh,
    H, M, n_valid, nG, CAP, scale,
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
    Kn = (tl.load(GRP + b * sgb + nG + g) - u0) * m
    for start in range(0, Kn, BLOCK_K):
        tk, t_ok, bits = _union_tile(GRP, sgb, b, u0, start, Kn, nG, CAP, m, BLOCK_K)
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
                    nG, CAP, n_valid, sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd,
                    d_ok, m: tl.constexpr, BLOCK_K: tl.constexpr, DOT_T: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """One key tile of a group's union: P (before the row correction), dP, and what the
    gradients need."""
    tk, t_ok, bits = _union_tile(GRP, sgb, b, u0, start, Kn, nG, CAP, m, BLOCK_K)
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
    H, M, n_valid, nG, CAP, scale,
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
    Kn = (tl.load(GRP + b * sgb + nG + g) - u0) * m
    single = Kn <= BLOCK_K
    if not single:  # several key tiles: one extra sweep for the row sums
        for start in range(0, Kn, BLOCK_K):
            p, dp, k, dx, dy, rr, inv_r = _bwd_group_tile(
                q, do, lse, pqx, pqy, q_row, r, K, V, POS, GRP, sgb, b, h, u0, start, Kn, nG, CAP,
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
            q, do, lse, pqx, pqy, q_row, r, K, V, POS, GRP, sgb, b, h, u0, start, Kn, nG, CAP,
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
    H, M, n_valid, nG, CAP, scale,
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
    n_in = (tl.load(GRP + b * sgb + nG + g) - u0) * m
    dk = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for start in range(0, n_in, BLOCK_K):
        tq, u_ok, bits = _union_tile(GRP, sgb, b, u0, start, n_in, nG, CAP, m, BLOCK_K)
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
                    G: int = 2, grp: torch.Tensor | None = None, block_k: int = 32,
                    num_warps: int | None = None):
    """Forward over groups of G clusters. Returns out (B, N, H, D) and lse (B, H, N) float32
    (base 2), as ``kernel.attention_forward``. ``grp``: ``group_neighbourhood(nbr, G)`` if the
    caller has it."""
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    grp = group_neighbourhood(nbr, G) if grp is None else check_groups(grp, B, M, Kc, G, False, "grp")
    nG = num_groups(M, G)
    pos = _ensure(pos, torch.float32)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _fwd_group_kernel[(nG, B * H)](
        q, k, v, pos, grp, w, wb, bk, bv, out, lse,
        q.stride(0), q.stride(1), q.stride(2), N * H * D, H * D, D, N * 2, 2, grp.shape[1], H * N, N,
        H, M, n_valid, nG, (grp.shape[1] - 2 * nG) // 2, float(scale),
        **_group_tiles(m, D, q.dtype, G, block_k, num_warps),
    )
    return out, lse


def grouped_backward(do, q, k, v, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v,
                     scale, G: int = 2, grp: torch.Tensor | None = None,
                     grp_t: torch.Tensor | None = None, block_k: int = 32,
                     num_warps: int | None = None, dqkv: torch.Tensor | None = None,
                     passes: str = "qkv"):
    """Backward over groups of G clusters: dq, dk, dv and the packed (6 H + 2 H D,) float32
    parameter gradients, as ``kernel.attention_backward``. ``grp`` / ``grp_t``:
    ``group_neighbourhood(nbr, G)`` and ``group_neighbourhood(nbr, G, transpose=True)``.
    ``passes``: "q" runs only the query-major pass (dq and the parameter gradients; dk, dv
    are left unwritten), for timing each pass alone."""
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    grp = group_neighbourhood(nbr, G) if grp is None else check_groups(grp, B, M, Kc, G, False, "grp")
    if grp_t is None:
        grp_t = group_neighbourhood(nbr, G, transpose=True)
    else:
        grp_t = check_groups(grp_t, B, M, Kc, G, True, "grp_t")
    nG = num_groups(M, G)
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
    strides = (*q.stride()[:3], N * H * D, H * D, D, *dq.stride()[:3], N * 2, 2)
    rows = torch.empty(2, B, H, N, device=dev, dtype=torch.float32)
    parts = torch.empty(6 * H + 2 * H * D, B * nG, device=dev, dtype=torch.float32)
    _bwd_q_group_kernel[(nG, B * H)](
        q, k, v, do, pos, grp, w, wb, bk, bv, lse, rows, dq, parts,
        *strides, grp.shape[1], H * N, N, B * H * N,
        H, M, n_valid, nG, (grp.shape[1] - 2 * nG) // 2, float(scale), **tiles,
    )
    if passes != "q":
        _bwd_kv_group_kernel[(nG, B * H)](
            q, k, v, do, pos, grp_t, w, wb, rows, dk, dv,
            *strides, grp_t.shape[1], H * N, N, B * H * N,
            H, M, n_valid, nG, (grp_t.shape[1] - 2 * nG) // 2, float(scale), **tiles,
        )
    return dq, dk, dv, parts.sum(-1)
