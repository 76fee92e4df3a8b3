"""Cluster attention, Triton kernels: Flash-style forward and backward (DESIGN section 3).

Computes exactly the function of ``reference.py`` (AFF cluster attention, Ziwen et al. 2023,
with the AFFMAE paper's streaming-softmax kernel, sec. "Flash-style cluster attention"):
per head, softmax over [the Kc * m keys of the neighbour clusters ; one learned blank key] of
q.k * scale + bias(p_k - p_q), applied to [neighbour values ; blank value].

How it is computed:
1. Forward, one program per (cluster, batch * head): the m queries of a cluster share their
   neighbourhood, so the query tile (m rows, padded to 16 for tensor cores) times a gathered key
   tile (64 keys = 8 neighbour clusters of 8) is one ``tl.dot``. The blank key/value is the initial
   state of the streaming softmax (running max = blank logit, running sum = 1, accumulator =
   blank value), so no row is ever empty. Logits, bias, softmax and accumulation are float32;
   the bias is computed in the kernel from the two positions and the (H, 5) + (H,) weights:
   no table, no (B, H, N, K) scores or biases in memory. Saved: output and the row log-sum-exp.
2. Backward pass 1, one program per (query cluster, batch * head): recompute P from the saved
   log-sum-exp; dQ in registers; the bias-weight and blank gradients reduced over the tile and
   written as one partial row per program (summed by torch: (B * M, H, 6) and (B * M, H, D) floats,
   never per query-key). It also stores delta = rowsum(dO * O) for pass 2.
3. dK / dV, two ways (``dkdv`` argument; see docs/BENCHMARKS.md for the measurement):
   "two_pass" (default): a second kernel over the transposed neighbourhood (for each key cluster,
   the query clusters that list it, built with one sort of ``nbr``), keys as the 16-row tile,
   gathered incoming queries as the 64-column tile, dK / dV accumulated in registers and written
   once in the input dtype. "atomic": pass 1 adds its dK / dV tiles into float32 buffers with
   atomics (no transposed neighbourhood, but every key receives ~Kc atomic tile adds).

Supported: q, k, v float32, bfloat16 or float16 (one dtype; output in it), head dim 16..128 (any,
padded to a power of two internally), any m (tokens per cluster) up to 64, any Kc (including
Kc > M with repeated clusters, the global case). Sizes B, N, M, Kc and n_valid are runtime
arguments (``do_not_specialize``), so a new batch size or resolution never recompiles.
With TRITON_INTERPRET=1 the same kernels run on CPU tensors through Triton's interpreter (tests).

Differences from the reference (all within rounding): both matrix products accumulate in float32
(the reference rounds q.k to the input dtype before adding the bias); the blank key enters in
float32; float32 inputs use IEEE (not TF32) products. Positions get no gradient.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
MAX_CLUSTER_SIZE = 64
BLOCK_K = 64  # keys (forward, pass 1) or gathered queries (pass 2) per tile
DKDV_MODES = ("two_pass", "atomic")
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Arguments that change with batch size or resolution: never compile-time specialised.
_DYNAMIC_FWD = ["sqb", "skb", "svb", "sob", "spb", "snb", "slb", "slh", "n_valid", "Kc"]
_DYNAMIC_BWD_Q = ["sqb", "skb", "svb", "sdob", "sdqb", "spb", "snb", "slb", "slh",
                  "N", "M", "n_valid", "Kc"]
_DYNAMIC_BWD_KV = ["sqb", "skb", "svb", "sdob", "sdkb", "sdvb", "spb", "ssb", "sfb", "slb", "slh",
                   "n_valid"]


def why_not(q: torch.Tensor) -> str | None:
    """Reason the kernel cannot run on tensors like ``q`` (B, N, H, D), or None when it can."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (use one of {SUPPORTED_DTYPES})"
    if q.dim() != 4:
        return f"q must be (B, N, H, D), got shape {tuple(q.shape)}"
    D = q.shape[-1]
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return f"head dim D={D} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if q.device.type == "cpu" and not _interpreting():
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device} is not supported"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# ----------------------------------------------------------------------------------------------
# Kernels. Under TRITON_INTERPRET=1 (set before triton is first imported: triton.language's own
# functions are wrapped at import) they run through Triton's interpreter on CPU tensors.
# Logits and log-sum-exp are kept in base 2 (x * log2(e)) so the softmax uses exp2.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bias_weights(W, WB, h):
    """Linear(5 -> H) weights of head h, times log2(e) (base-2 logits)."""
    LOG2E = 1.4426950408889634
    w0 = tl.load(W + h * 5) * LOG2E
    w1 = tl.load(W + h * 5 + 1) * LOG2E
    w2 = tl.load(W + h * 5 + 2) * LOG2E
    w3 = tl.load(W + h * 5 + 3) * LOG2E
    w4 = tl.load(W + h * 5 + 4) * LOG2E
    wb = tl.load(WB + h) * LOG2E
    return w0, w1, w2, w3, w4, wb


@triton.jit
def _relpos_bias(dx, dy, w0, w1, w2, w3, w4, wb):
    """Bias of offsets (dx, dy) = p_key - p_query: Linear(5 -> 1) of (dx, dy, r, dx/r, dy/r).

    Returns the bias tile and the two features the bias-weight gradient needs (r, 1/r or 0)."""
    r = tl.sqrt(dx * dx + dy * dy)
    inv_r = tl.where(r > 0, 1.0 / tl.maximum(r, 1e-12), 0.0)
    return w0 * dx + w1 * dy + w2 * r + (w3 * dx + w4 * dy) * inv_r + wb, r, inv_r


@triton.jit(do_not_specialize=_DYNAMIC_FWD)
def _fwd_kernel(
    Q, K, V, POS, NBR, W, WB, BK, BV, O, LSE,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    spb, spn, snb, snm, slb, slh,
    H, n_valid, Kc, scale,
    m: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    qk_scale = scale * 1.4426950408889634

    # 1. The m queries of cluster c (rows >= m pad the tile to 16 rows for tensor cores).
    rq = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    q_row = rq < m
    d_ok = rd < D
    tq = c * m + rq
    q = tl.load(Q + b * sqb + h * sqh + tq[:, None] * sqn + rd[None, :],
                mask=q_row[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_Q, BLOCK_D)
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # 2. The blank key/value is the initial softmax state: max = its logit, sum = 1, acc = value.
    bk = tl.load(BK + h * D + rd, mask=d_ok, other=0.0)  # float32 (BLOCK_D,)
    bv = tl.load(BV + h * D + rd, mask=d_ok, other=0.0)
    m_i = tl.sum(q.to(tl.float32) * bk[None, :], 1) * qk_scale  # (BLOCK_Q,)
    l_i = tl.full([BLOCK_Q], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32) + bv[None, :]

    # 3. Stream over the gathered neighbourhood, BLOCK_K keys at a time (flat index t -> slot
    #    t // m of nbr[b, c], token t % m of that cluster).
    Kn = Kc * m
    for start in range(0, Kn, BLOCK_K):
        t = start + tl.arange(0, BLOCK_K)
        t_ok = t < Kn
        cl = tl.load(NBR + b * snb + c * snm + t // m, mask=t_ok, other=0)
        tk = cl * m + t % m
        kd_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + tk[:, None] * skn + rd[None, :], mask=kd_ok, other=0.0)
        pkx = tl.load(POS + b * spb + tk * spn, mask=t_ok, other=0.0)
        pky = tl.load(POS + b * spb + tk * spn + 1, mask=t_ok, other=0.0)
        s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC) * qk_scale
        bias, r, inv_r = _relpos_bias(pkx[None, :] - pqx[:, None], pky[None, :] - pqy[:, None],
                                      w0, w1, w2, w3, w4, wb)
        s = tl.where((t_ok & (tk < n_valid))[None, :], s + bias, -1.0e30)  # (BLOCK_Q, BLOCK_K)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + tk[:, None] * svn + rd[None, :], mask=kd_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), v.to(DOT_T), input_precision=DOT_PREC)
        m_i = m_new

    # 4. Normalise, store the output (input dtype) and the base-2 log-sum-exp.
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + tq[:, None] * son + rd[None, :],
             out.to(O.dtype.element_ty), mask=q_row[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + tq, m_i + tl.log2(l_i), mask=q_row)


@triton.jit
def _bwd_tile(q, do, lse, pqx, pqy, q_row, K, V, POS, NBR, b, c, h, start, Kn, n_valid,
              skb, skn, skh, svb, svn, svh, spb, spn, snb, snm, qk_scale,
              w0, w1, w2, w3, w4, wb, rd, d_ok,
              m: tl.constexpr, BLOCK_K: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr):
    """Recompute one key tile of a query cluster's neighbourhood: P and dP = dO V^T."""
    t = start + tl.arange(0, BLOCK_K)
    t_ok = t < Kn
    cl = tl.load(NBR + b * snb + c * snm + t // m, mask=t_ok, other=0)
    tk = cl * m + t % m
    kd_ok = t_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + tk[:, None] * skn + rd[None, :], mask=kd_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + tk[:, None] * svn + rd[None, :], mask=kd_ok, other=0.0)
    pkx = tl.load(POS + b * spb + tk * spn, mask=t_ok, other=0.0)
    pky = tl.load(POS + b * spb + tk * spn + 1, mask=t_ok, other=0.0)
    dx = pkx[None, :] - pqx[:, None]
    dy = pky[None, :] - pqy[:, None]
    s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC) * qk_scale
    bias, r, inv_r = _relpos_bias(dx, dy, w0, w1, w2, w3, w4, wb)
    k_ok = t_ok & (tk < n_valid)
    s = tl.where(k_ok[None, :] & q_row[:, None], s + bias, -1.0e30)
    p = tl.exp2(s - lse[:, None])  # (BLOCK_Q, BLOCK_K)
    dp = tl.dot(do.to(DOT_T), tl.trans(v.to(DOT_T)), input_precision=DOT_PREC)
    return p, dp, k, tk, k_ok, dx, dy, r, inv_r


@triton.jit(do_not_specialize=_DYNAMIC_BWD_Q)
def _bwd_q_kernel(
    Q, K, V, DO, POS, NBR, W, WB, BK, BV, LSE, DELTA,
    DQ, GB, GBK, GBV, DK32, DV32,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
    sdqb, sdqn, sdqh, spb, spn, snb, snm, slb, slh,
    H, N, M, n_valid, Kc, scale,
    m: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
    SINGLE_TILE: tl.constexpr, ATOMIC: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    qk_scale = scale * 1.4426950408889634

    # 1. Query tile, its upstream gradient, saved log-sum-exp.
    rq = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    q_row = rq < m
    d_ok = rd < D
    qd_ok = q_row[:, None] & d_ok[None, :]
    tq = c * m + rq
    q = tl.load(Q + b * sqb + h * sqh + tq[:, None] * sqn + rd[None, :], mask=qd_ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + tq[:, None] * sdon + rd[None, :], mask=qd_ok, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + tq, mask=q_row, other=0.0)
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # 2. Blank key/value: probability and dP. delta = sum_j P_j dP_j over the row (blank
    #    included) is accumulated in float32 from the recomputed P, not as rowsum(dO * O) with O
    #    rounded to the input dtype: the bias-weight gradient sums dS over all (query, key) pairs,
    #    where that rounding does not cancel (it gave ~10x the reference's error in fp16 / bf16).
    bk = tl.load(BK + h * D + rd, mask=d_ok, other=0.0)
    bv = tl.load(BV + h * D + rd, mask=d_ok, other=0.0)
    p_b = tl.exp2(tl.sum(q.to(tl.float32) * bk[None, :], 1) * qk_scale - lse)
    p_b = tl.where(q_row, p_b, 0.0)
    dp_b = tl.sum(do.to(tl.float32) * bv[None, :], 1)
    delta = p_b * dp_b  # (BLOCK_Q,)
    Kn = Kc * m
    if not SINGLE_TILE:  # several key tiles: one extra sweep for delta
        for start in range(0, Kn, BLOCK_K):
            p, dp, k, tk, k_ok, dx, dy, r, inv_r = _bwd_tile(
                q, do, lse, pqx, pqy, q_row, K, V, POS, NBR, b, c, h, start, Kn, n_valid,
                skb, skn, skh, svb, svn, svh, spb, spn, snb, snm, qk_scale,
                w0, w1, w2, w3, w4, wb, rd, d_ok, m, BLOCK_K, DOT_T, DOT_PREC)
            delta += tl.sum(p * dp, 1)

    # 3. Stream over the neighbourhood: dS, dQ, the bias-weight gradient (dS times each
    #    relative-position feature, reduced) and, in atomic mode, this tile's dK / dV.
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    g0 = tl.zeros([BLOCK_Q], tl.float32)
    g1 = tl.zeros([BLOCK_Q], tl.float32)
    g2 = tl.zeros([BLOCK_Q], tl.float32)
    g3 = tl.zeros([BLOCK_Q], tl.float32)
    g4 = tl.zeros([BLOCK_Q], tl.float32)
    g5 = tl.zeros([BLOCK_Q], tl.float32)
    for start in range(0, Kn, BLOCK_K):
        p, dp, k, tk, k_ok, dx, dy, r, inv_r = _bwd_tile(
            q, do, lse, pqx, pqy, q_row, K, V, POS, NBR, b, c, h, start, Kn, n_valid,
            skb, skn, skh, svb, svn, svh, spb, spn, snb, snm, qk_scale,
            w0, w1, w2, w3, w4, wb, rd, d_ok, m, BLOCK_K, DOT_T, DOT_PREC)
        if SINGLE_TILE:  # this is the only tile: delta is complete after it
            delta += tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])  # gradient of the natural-unit logit
        dq += tl.dot(ds.to(DOT_T), k.to(DOT_T), input_precision=DOT_PREC)
        g0 += tl.sum(ds * dx, 1)
        g1 += tl.sum(ds * dy, 1)
        g2 += tl.sum(ds * r, 1)
        g3 += tl.sum(ds * dx * inv_r, 1)
        g4 += tl.sum(ds * dy * inv_r, 1)
        g5 += tl.sum(ds, 1)
        if ATOMIC:
            dk_t = tl.dot(tl.trans(ds).to(DOT_T), q.to(DOT_T), input_precision=DOT_PREC) * scale
            dv_t = tl.dot(tl.trans(p).to(DOT_T), do.to(DOT_T), input_precision=DOT_PREC)
            off = ((b * N + tk[:, None]) * H + h) * D + rd[None, :]  # float32 (B, N, H, D) buffers
            kv_ok = k_ok[:, None] & d_ok[None, :]
            tl.atomic_add(DK32 + off, dk_t, mask=kv_ok)
            tl.atomic_add(DV32 + off, dv_t, mask=kv_ok)

    # 4. Blank gradients, dQ (input dtype), delta for pass 2, one partial row per program of the
    #    bias-weight and blank gradients (summed by the launcher).
    ds_b = p_b * (dp_b - delta)
    dq += ds_b[:, None] * bk[None, :]
    tl.store(DQ + b * sdqb + h * sdqh + tq[:, None] * sdqn + rd[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_ok)
    tl.store(DELTA + b * slb + h * slh + tq, delta, mask=q_row)
    part = (b * M + c) * H + h
    tl.store(GBK + part * D + rd, tl.sum(ds_b[:, None] * q.to(tl.float32), 0) * scale, mask=d_ok)
    tl.store(GBV + part * D + rd, tl.sum(p_b[:, None] * do.to(tl.float32), 0), mask=d_ok)
    tl.store(GB + part * 8, tl.sum(g0, 0))
    tl.store(GB + part * 8 + 1, tl.sum(g1, 0))
    tl.store(GB + part * 8 + 2, tl.sum(g2, 0))
    tl.store(GB + part * 8 + 3, tl.sum(g3, 0))
    tl.store(GB + part * 8 + 4, tl.sum(g4, 0))
    tl.store(GB + part * 8 + 5, tl.sum(g5, 0))


@triton.jit(do_not_specialize=_DYNAMIC_BWD_KV)
def _bwd_kv_kernel(
    Q, K, V, DO, POS, SRC, OFF, W, WB, LSE, DELTA, DK, DV,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
    sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, spb, spn, ssb, sfb, slb, slh,
    H, n_valid, scale,
    m: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Key-major pass: program (key cluster c, batch * head) gathers every query cluster whose
    # neighbourhood lists c (SRC[b, OFF[b, c] : OFF[b, c + 1]]) and accumulates dK, dV.
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    qk_scale = scale * 1.4426950408889634

    # 1. The m keys / values of cluster c (rows, padded to the 16-row tile).
    rk = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    k_row = rk < m
    d_ok = rd < D
    kd_ok = k_row[:, None] & d_ok[None, :]
    tk = c * m + rk
    k_ok = k_row & (tk < n_valid)
    k = tl.load(K + b * skb + h * skh + tk[:, None] * skn + rd[None, :], mask=kd_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + tk[:, None] * svn + rd[None, :], mask=kd_ok, other=0.0)
    pkx = tl.load(POS + b * spb + tk * spn, mask=k_row, other=0.0)
    pky = tl.load(POS + b * spb + tk * spn + 1, mask=k_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # 2. Stream over the incoming queries, BLOCK_K at a time (flat index u -> incoming entry
    #    u // m, token u % m of that query cluster); S, P, dP are transposed (keys x queries).
    start = tl.load(OFF + b * sfb + c)
    n_in = (tl.load(OFF + b * sfb + c + 1) - start) * m
    dk = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for u0 in range(0, n_in, BLOCK_K):
        u = u0 + tl.arange(0, BLOCK_K)
        u_ok = u < n_in
        qc = tl.load(SRC + b * ssb + start + u // m, mask=u_ok, other=0)
        tq = qc * m + u % m
        qd = u_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + tq[:, None] * sqn + rd[None, :], mask=qd, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + tq[:, None] * sdon + rd[None, :], mask=qd, other=0.0)
        lse = tl.load(LSE + b * slb + h * slh + tq, mask=u_ok, other=0.0)
        delta = tl.load(DELTA + b * slb + h * slh + tq, mask=u_ok, other=0.0)
        pqx = tl.load(POS + b * spb + tq * spn, mask=u_ok, other=0.0)
        pqy = tl.load(POS + b * spb + tq * spn + 1, mask=u_ok, other=0.0)
        s = tl.dot(k.to(DOT_T), tl.trans(q.to(DOT_T)), input_precision=DOT_PREC) * qk_scale
        bias, r, inv_r = _relpos_bias(pkx[:, None] - pqx[None, :], pky[:, None] - pqy[None, :],
                                      w0, w1, w2, w3, w4, wb)
        s = tl.where(k_ok[:, None] & u_ok[None, :], s + bias, -1.0e30)  # (BLOCK_Q, BLOCK_K)
        p = tl.exp2(s - lse[None, :])
        dv += tl.dot(p.to(DOT_T), do.to(DOT_T), input_precision=DOT_PREC)
        dp = tl.dot(v.to(DOT_T), tl.trans(do.to(DOT_T)), input_precision=DOT_PREC)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(DOT_T), q.to(DOT_T), input_precision=DOT_PREC)

    # 3. Written once, in the input dtype (padded keys get exact zeros).
    tl.store(DK + b * sdkb + h * sdkh + tk[:, None] * sdkn + rd[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV + b * sdvb + h * sdvh + tk[:, None] * sdvn + rd[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v) -> int:
    """Validate shapes and dtypes (errors name the bad value); returns m, the cluster size."""
    reason = why_not(q)
    if reason:
        raise ValueError(reason)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    B, N, H, D = q.shape
    if nbr.dim() != 3 or nbr.shape[0] != B or nbr.shape[1] == 0 or N % nbr.shape[1] != 0:
        raise ValueError(f"nbr must be (B={B}, M, Kc) with N={N} a multiple of M, got {tuple(nbr.shape)}")
    if nbr.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"nbr must be int64 or int32, got {nbr.dtype}")
    m = N // nbr.shape[1]
    if m > MAX_CLUSTER_SIZE:
        raise ValueError(f"cluster size m={m} exceeds {MAX_CLUSTER_SIZE}")
    if tuple(pos.shape) != (B, N, 2):
        raise ValueError(f"pos must be ({B}, {N}, 2), got {tuple(pos.shape)}")
    if not 0 < n_valid <= N:
        raise ValueError(f"n_valid={n_valid} must be in [1, N={N}]")
    if tuple(bias_weight.shape) != (H, 5) or tuple(bias_bias.shape) != (H,):
        raise ValueError(
            f"bias_weight / bias_bias must be ({H}, 5) / ({H},), got "
            f"{tuple(bias_weight.shape)} / {tuple(bias_bias.shape)}"
        )
    if tuple(blank_k.shape) != (H, D) or tuple(blank_v.shape) != (H, D):
        raise ValueError(
            f"blank_k / blank_v must be ({H}, {D}), got {tuple(blank_k.shape)} / {tuple(blank_v.shape)}"
        )
    return m


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Kernels index the head dim with stride 1; other strides are free (e.g. views of a fused qkv
    # projection), so copy only when the last one is not 1.
    return x if x.stride(-1) == 1 else x.contiguous()


def _params(bias_weight, bias_bias, blank_k, blank_v):
    # The small parameters enter as float32 whatever their dtype.
    return tuple(t.detach().float().contiguous() for t in (bias_weight, bias_bias, blank_k, blank_v))


def _tiles(m: int, D: int, dtype: torch.dtype) -> dict:
    """Compile-time tile parameters: these depend on the model, never on batch size or resolution."""
    # Products take the input dtype (tensor cores, float32 accumulation). Triton's interpreter
    # multiplies bfloat16 as raw integers, so there bfloat16 operands are widened to float32 first:
    # exact, since a bfloat16 x bfloat16 product fits a float32 mantissa.
    dot_t = _TL_DTYPE[dtype]
    if dtype == torch.bfloat16 and _interpreting():
        dot_t = tl.float32
    block_d = max(16, triton.next_power_of_2(D))
    return dict(
        m=m, D=D, BLOCK_Q=max(16, triton.next_power_of_2(m)), BLOCK_K=BLOCK_K, BLOCK_D=block_d,
        DOT_T=dot_t, DOT_PREC="ieee" if dot_t == tl.float32 else "tf32",
        num_warps=4 if block_d <= 64 else 8,
    )


def attention_forward(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale):
    """Forward kernel. Returns out (B, N, H, D) in q's dtype and lse (B, H, N) float32, base 2."""
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    pos = pos.float().contiguous()  # (B, N, 2)
    nbr = nbr.contiguous()  # (B, M, Kc)
    w, wb, bk, bv = _params(bias_weight, bias_bias, blank_k, blank_v)
    out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _fwd_kernel[(M, B * H)](
        q, k, v, pos, nbr, w, wb, bk, bv, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pos.stride(0), pos.stride(1), nbr.stride(0), nbr.stride(1), lse.stride(0), lse.stride(1),
        H, n_valid, Kc, float(scale),
        **_tiles(m, D, q.dtype),
    )
    return out, lse


def transposed_neighbourhood(nbr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key cluster, the query clusters whose neighbourhood lists it (CSR, repeats kept).

    Args:
        nbr: (B, M, Kc) neighbour clusters of each query cluster.
    Returns:
        src (B, M * Kc) int32 query clusters grouped by key cluster, off (B, M + 1) int32: the
        query clusters of key cluster c are src[b, off[b, c] : off[b, c + 1]].
    """
    B, M, Kc = nbr.shape
    flat = nbr.reshape(B, M * Kc)  # (B, M*Kc) key cluster of each (query cluster, slot)
    key_sorted, order = torch.sort(flat, dim=1, stable=True)
    src = (order // Kc).to(torch.int32)
    bounds = torch.arange(M + 1, device=nbr.device, dtype=key_sorted.dtype).expand(B, M + 1)
    off = torch.searchsorted(key_sorted.contiguous(), bounds.contiguous()).to(torch.int32)
    return src.contiguous(), off.contiguous()


def attention_backward(
    do, q, k, v, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    dkdv: str = "two_pass",
):
    """Backward kernels. Returns dq, dk, dv, d bias_weight, d bias_bias, d blank_k, d blank_v.

    ``dkdv``: "two_pass" (key-major second kernel) or "atomic" (float32 atomics in pass 1).
    """
    if dkdv not in DKDV_MODES:
        raise ValueError(f"dkdv must be one of {DKDV_MODES}, got {dkdv!r}")
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    do = _last_contiguous(do.to(q.dtype))
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    pos = pos.float().contiguous()  # (B, N, 2)
    nbr = nbr.contiguous()  # (B, M, Kc)
    w, wb, bk, bv = _params(bias_weight, bias_bias, blank_k, blank_v)
    dev = q.device
    tiles = _tiles(m, D, q.dtype)
    atomic = dkdv == "atomic"

    dq = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
    delta = torch.empty(B, H, N, device=dev, dtype=torch.float32)  # sum_j P dP per query row
    g_bias = torch.empty(B * M, H, 8, device=dev, dtype=torch.float32)  # one partial row per program
    g_bk = torch.empty(B * M, H, D, device=dev, dtype=torch.float32)
    g_bv = torch.empty(B * M, H, D, device=dev, dtype=torch.float32)
    if atomic:
        dk32 = torch.zeros(B, N, H, D, device=dev, dtype=torch.float32)
        dv32 = torch.zeros(B, N, H, D, device=dev, dtype=torch.float32)
    else:
        dk32 = dv32 = g_bias  # not touched when ATOMIC is off
    _bwd_q_kernel[(M, B * H)](
        q, k, v, do, pos, nbr, w, wb, bk, bv, lse, delta,
        dq, g_bias, g_bk, g_bv, dk32, dv32,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        pos.stride(0), pos.stride(1), nbr.stride(0), nbr.stride(1), lse.stride(0), lse.stride(1),
        H, N, M, n_valid, Kc, float(scale),
        SINGLE_TILE=Kc * m <= BLOCK_K, ATOMIC=atomic, **tiles,
    )
    if atomic:
        dk, dv = dk32.to(q.dtype), dv32.to(q.dtype)
    else:
        src, off = transposed_neighbourhood(nbr)
        dk = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
        dv = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
        _bwd_kv_kernel[(M, B * H)](
            q, k, v, do, pos, src, off, w, wb, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            pos.stride(0), pos.stride(1), src.stride(0), off.stride(0), lse.stride(0), lse.stride(1),
            H, n_valid, float(scale),
            **tiles,
        )
    g = g_bias.sum(0)  # (H, 8): the 5 weight columns, the bias, 2 unused
    return (
        dq, dk, dv,
        g[:, :5].to(bias_weight.dtype, copy=True), g[:, 5].to(bias_bias.dtype, copy=True),
        g_bk.sum(0).to(blank_k.dtype), g_bv.sum(0).to(blank_v.dtype),
    )
