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
   log-sum-exp and renormalise each row in float32 (so sum_j dS_j = 0 holds to float32 rounding
   even when huge logits make the stored log-sum-exp coarse); delta = sum_j P_j dP_j from that P
   (not rowsum(dO * O) with O rounded to the input dtype: the bias-weight gradient sums dS over
   all query-key pairs, where that rounding does not cancel and gave ~10x the reference's error).
   dQ in registers; the bias-weight and blank gradients reduced over the tile and written as one
   partial column per program ((6 H + 2 H D, B * M) floats, summed by torch; never per
   query-key), parameter-major, so each parameter's gradient is a contiguous piece of the sum.
3. dK / dV, two ways (``dkdv`` argument; docs/BENCHMARKS.md has the measurement):
   "two_pass" (default, 1.9-2.7x faster on an H100): a second kernel over the transposed
   neighbourhood (for each key cluster, the query clusters that list it, built by a small
   deterministic counting kernel): keys are the 16-row tile, gathered incoming queries the
   64-column tile, dK / dV accumulate in registers and are written once.
   "atomic": pass 1 adds its dK / dV tiles into float32 buffers with atomics.

Supported: q, k, v float32, bfloat16 or float16 (one dtype; output in it), head dim 16..128 (any,
padded to a power of two internally), any m (tokens per cluster) up to 64, any Kc (including
Kc > M with repeated clusters, the global case). Sizes (B, N, M, Kc, H, n_valid) are runtime
arguments that are never specialised (``do_not_specialize``); tensor strides are specialised only
the way Triton always does, on divisibility by 16 (alignment, which vectorised loads need), so at
most a couple of variants ever compile and a new batch size or resolution does not recompile.
With TRITON_INTERPRET=1 the same kernels run on CPU tensors through Triton's interpreter (tests).

Differences from the reference (all within rounding): both matrix products accumulate in float32
(the reference rounds q.k to the input dtype before adding the bias); the blank key enters in
float32; float32 inputs use IEEE (not TF32) products. Positions get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from affmae.ops.dispatch import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
MAX_CLUSTER_SIZE = 64
BLOCK_K = 64  # keys (forward, pass 1) or gathered queries (pass 2) per tile
DKDV_MODES = ("two_pass", "atomic")
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SIZES = ["H", "N", "M", "n_valid", "Kc"]  # never specialised (see the module docstring)


def why_not(q: torch.Tensor) -> str | None:
    """Reason the kernel cannot run on tensors like ``q`` (B, N, H, D), or None when it can."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (use one of {SUPPORTED_DTYPES})"
    if q.dim() != 4:
        return f"q must be (B, N, H, D), got shape {tuple(q.shape)}"
    D = q.shape[-1]
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return f"head dim D={D} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if q.device.type == "cpu" and not interpreting():
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)"
    if q.device.type not in ("cuda", "cpu"):
        return f"device {q.device} is not supported"
    return None


# ----------------------------------------------------------------------------------------------
# Kernels. Under TRITON_INTERPRET=1 (set before triton is first imported: triton.language's own
# functions are wrapped at import) they run through Triton's interpreter on CPU tensors.
# Logits and log-sum-exp are kept in base 2 (x * log2(e)) so the softmax uses exp2.
# Token tensors: q, k, v share strides (sb, sn, sh); out and dO are contiguous (B, N, H, D) with
# strides (ob, on, oh); dq, dk, dv share strides (gb, gn, gh): contiguous (B, N, H, D) too, or
# the three slices of one packed (B, N, 3, H, D) gradient. The head dim has stride 1 everywhere.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bias_weights(W, WB, h):
    """Linear(5 -> H) weights of head h as float32, times log2(e) (base-2 logits)."""
    LOG2E = 1.4426950408889634
    w0 = tl.load(W + h * 5).to(tl.float32) * LOG2E
    w1 = tl.load(W + h * 5 + 1).to(tl.float32) * LOG2E
    w2 = tl.load(W + h * 5 + 2).to(tl.float32) * LOG2E
    w3 = tl.load(W + h * 5 + 3).to(tl.float32) * LOG2E
    w4 = tl.load(W + h * 5 + 4).to(tl.float32) * LOG2E
    wb = tl.load(WB + h).to(tl.float32) * LOG2E
    return w0, w1, w2, w3, w4, wb


@triton.jit
def _relpos_bias(dx, dy, w0, w1, w2, w3, w4, wb):
    """Bias of offsets (dx, dy) = p_key - p_query: Linear(5 -> 1) of (dx, dy, r, dx/r, dy/r).

    Returns the bias tile and the two features the bias-weight gradient needs (r, 1/r or 0)."""
    r2 = dx * dx + dy * dy
    inv_r = tl.where(r2 > 0, tl.rsqrt(tl.where(r2 > 0, r2, 1.0)), 0.0)  # one special-function op
    r = r2 * inv_r
    return w0 * dx + w1 * dy + w2 * r + (w3 * dx + w4 * dy) * inv_r + wb, r, inv_r


@triton.jit
def _key_tile(NBR, POS, b, c, start, Kn, snb, snm, spb, spn,
              m: tl.constexpr, BLOCK_K: tl.constexpr):
    """Token indices and positions of keys start .. start + BLOCK_K of cluster c's neighbourhood:
    flat index t -> slot t // m of nbr[b, c], token t % m of that cluster."""
    t = start + tl.arange(0, BLOCK_K)
    t_ok = t < Kn
    cl = tl.load(NBR + b * snb + c * snm + t // m, mask=t_ok, other=0).to(tl.int32)
    tk = cl * m + t % m
    pkx = tl.load(POS + b * spb + tk * spn, mask=t_ok, other=0.0)
    pky = tl.load(POS + b * spb + tk * spn + 1, mask=t_ok, other=0.0)
    return tk, t_ok, pkx, pky


@triton.jit(do_not_specialize=_SIZES)
def _fwd_kernel(
    Q, K, V, POS, NBR, W, WB, BK, BV, O, LSE,
    sb, sn, sh, ob, on, oh, spb, spn, snb, snm, slb, slh,
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
    q = tl.load(Q + b * sb + h * sh + tq[:, None] * sn + rd[None, :],
                mask=q_row[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_Q, BLOCK_D)
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # 2. The blank key/value is the initial softmax state: max = its logit, sum = 1, acc = value.
    bk = tl.load(BK + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    bv = tl.load(BV + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    m_i = tl.sum(q.to(tl.float32) * bk[None, :], 1) * qk_scale  # (BLOCK_Q,)
    l_i = tl.full([BLOCK_Q], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32) + bv[None, :]

    # 3. Stream over the gathered neighbourhood, BLOCK_K keys at a time.
    Kn = Kc * m
    for start in range(0, Kn, BLOCK_K):
        tk, t_ok, pkx, pky = _key_tile(NBR, POS, b, c, start, Kn, snb, snm, spb, spn, m, BLOCK_K)
        kd_ok = t_ok[:, None] & d_ok[None, :]
        # V is loaded with K (before the first product) so both loads are in flight together.
        k = tl.load(K + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
        v = tl.load(V + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
        s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC) * qk_scale
        bias, r, inv_r = _relpos_bias(pkx[None, :] - pqx[:, None], pky[None, :] - pqy[:, None],
                                      w0, w1, w2, w3, w4, wb)
        s = tl.where((t_ok & (tk < n_valid))[None, :], s + bias, -1.0e30)  # (BLOCK_Q, BLOCK_K)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), v.to(DOT_T), input_precision=DOT_PREC)
        m_i = m_new

    # 4. Normalise, store the output (input dtype) and the base-2 log-sum-exp.
    out = acc / l_i[:, None]
    tl.store(O + b * ob + h * oh + tq[:, None] * on + rd[None, :],
             out.to(O.dtype.element_ty), mask=q_row[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + tq, m_i + tl.log2(l_i), mask=q_row)


@triton.jit
def _bwd_tile(q, do, lse, pqx, pqy, q_row, K, V, POS, NBR, b, c, h, start, Kn, n_valid,
              sb, sn, sh, spb, spn, snb, snm, qk_scale, w0, w1, w2, w3, w4, wb, rd, d_ok,
              m: tl.constexpr, BLOCK_K: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr):
    """Recompute one key tile of a query cluster's neighbourhood: P (unnormalised by the row
    correction) and dP = dO V^T, with what the gradients need."""
    tk, t_ok, pkx, pky = _key_tile(NBR, POS, b, c, start, Kn, snb, snm, spb, spn, m, BLOCK_K)
    kd_ok = t_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
    v = tl.load(V + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
    dx = pkx[None, :] - pqx[:, None]
    dy = pky[None, :] - pqy[:, None]
    s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC) * qk_scale
    bias, r, inv_r = _relpos_bias(dx, dy, w0, w1, w2, w3, w4, wb)
    k_ok = t_ok & (tk < n_valid)
    s = tl.where(k_ok[None, :] & q_row[:, None], s + bias, -1.0e30)
    p = tl.exp2(s - lse[:, None])  # (BLOCK_Q, BLOCK_K)
    dp = tl.dot(do.to(DOT_T), tl.trans(v.to(DOT_T)), input_precision=DOT_PREC)
    return p, dp, k, tk, k_ok, dx, dy, r, inv_r


@triton.jit(do_not_specialize=_SIZES)
def _bwd_q_kernel(
    Q, K, V, DO, POS, NBR, W, WB, BK, BV, LSE, ROWS, DQ, GP, DKV32,
    sb, sn, sh, ob, on, oh, gb, gn, gh, spb, spn, snb, snm, slb, slh, rows_stride,
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
    q = tl.load(Q + b * sb + h * sh + tq[:, None] * sn + rd[None, :], mask=qd_ok, other=0.0)
    do = tl.load(DO + b * ob + h * oh + tq[:, None] * on + rd[None, :], mask=qd_ok, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + tq, mask=q_row, other=0.0)
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # 2. Row sums of P and of P dP (blank included), for the row correction and delta.
    bk = tl.load(BK + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    bv = tl.load(BV + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    p_b = tl.exp2(tl.sum(q.to(tl.float32) * bk[None, :], 1) * qk_scale - lse)
    p_b = tl.where(q_row, p_b, 0.0)
    dp_b = tl.sum(do.to(tl.float32) * bv[None, :], 1)
    p_sum = p_b  # (BLOCK_Q,)
    pdp_sum = p_b * dp_b
    Kn = Kc * m
    if not SINGLE_TILE:  # several key tiles: one extra sweep for the row sums
        for start in range(0, Kn, BLOCK_K):
            p, dp, k, tk, k_ok, dx, dy, r, inv_r = _bwd_tile(
                q, do, lse, pqx, pqy, q_row, K, V, POS, NBR, b, c, h, start, Kn, n_valid,
                sb, sn, sh, spb, spn, snb, snm, qk_scale, w0, w1, w2, w3, w4, wb, rd, d_ok,
                m, BLOCK_K, DOT_T, DOT_PREC)
            p_sum += tl.sum(p, 1)
            pdp_sum += tl.sum(p * dp, 1)

    # 3. Stream over the neighbourhood: dS, dQ, the bias-weight gradient (dS times each
    #    relative-position feature, reduced) and, in atomic mode, this tile's dK / dV.
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
        p, dp, k, tk, k_ok, dx, dy, r, inv_r = _bwd_tile(
            q, do, lse, pqx, pqy, q_row, K, V, POS, NBR, b, c, h, start, Kn, n_valid,
            sb, sn, sh, spb, spn, snb, snm, qk_scale, w0, w1, w2, w3, w4, wb, rd, d_ok,
            m, BLOCK_K, DOT_T, DOT_PREC)
        if SINGLE_TILE:  # this is the only tile: the row sums are complete after it
            p_sum += tl.sum(p, 1)
            pdp_sum += tl.sum(p * dp, 1)
            inv_sum = tl.where(q_row, 1.0 / tl.where(q_row, p_sum, 1.0), 0.0)
            delta = pdp_sum * inv_sum
        p = p * inv_sum[:, None]
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
            # float32 (2, B, N, H, D) buffer in dO's layout: dK then dV
            off = b * ob + h * oh + tk[:, None] * on + rd[None, :]
            kv_ok = k_ok[:, None] & d_ok[None, :]
            tl.atomic_add(DKV32 + off, dk_t, mask=kv_ok)
            tl.atomic_add(DKV32 + (tl.num_programs(1) // H).to(tl.int64) * ob + off, dv_t, mask=kv_ok)

    # 4. Blank gradients, dQ (input dtype), the corrected log-sum-exp and delta for pass 2, one
    #    partial column per program: [6 bias-weight terms, 2 unused, d blank_k (D), d blank_v (D)].
    p_b = p_b * inv_sum
    ds_b = p_b * (dp_b - delta)
    dq += ds_b[:, None] * bk[None, :]
    tl.store(DQ + b * gb + h * gh + tq[:, None] * gn + rd[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_ok)
    # ROWS: (2, B, H, N) float32, the corrected log-sum-exp then delta.
    tl.store(ROWS + b * slb + h * slh + tq, lse + tl.log2(tl.where(q_row, p_sum, 1.0)), mask=q_row)
    tl.store(ROWS + rows_stride + b * slb + h * slh + tq, delta, mask=q_row)
    # GP is (6 H + 2 H D, P) with P = B * M programs per head, program-minor: the launcher's
    # reduction then runs over the contiguous last dim (PyTorch's column sums over dim 0 of a
    # (P, rows) layout took 8-20 us per call on an H200). Rows are parameter-major: bias
    # weight (H, 5), bias bias (H,), blank k (H, D), blank v (H, D), so each parameter's
    # gradient is a contiguous piece of the sum that autograd takes as it is (a piece of a
    # per-head row layout was copied once per parameter: 64 copies per aff_small step).
    P = (tl.num_programs(1) // H) * M
    col = GP + (b * M + c)
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


@triton.jit(do_not_specialize=_SIZES)
def _bwd_kv_kernel(
    Q, K, V, DO, POS, CSR, W, WB, ROWS, DK, DV,
    sb, sn, sh, ob, on, oh, gb, gn, gh, spb, spn, slb, slh, rows_stride,
    H, M, Kc, n_valid, scale,
    m: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Key-major pass: program (key cluster c, batch * head) gathers every query cluster whose
    # neighbourhood lists c and accumulates dK, dV. CSR: (B, M * Kc + M + 1) int32, per batch
    # element the query clusters grouped by key cluster, then the M + 1 offsets.
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
    k = tl.load(K + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
    v = tl.load(V + b * sb + h * sh + tk[:, None] * sn + rd[None, :], mask=kd_ok, other=0.0)
    pkx = tl.load(POS + b * spb + tk * spn, mask=k_row, other=0.0)
    pky = tl.load(POS + b * spb + tk * spn + 1, mask=k_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # 2. Stream over the incoming queries, BLOCK_K at a time (flat index u -> incoming entry
    #    u // m, token u % m of that query cluster); S, P, dP are transposed (keys x queries).
    E = M * Kc
    SRC = CSR + b * (E + M + 1)
    start = tl.load(SRC + E + c)
    n_in = (tl.load(SRC + E + c + 1) - start) * m
    dk = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for u0 in range(0, n_in, BLOCK_K):
        u = u0 + tl.arange(0, BLOCK_K)
        u_ok = u < n_in
        qc = tl.load(SRC + start + u // m, mask=u_ok, other=0)
        tq = qc * m + u % m
        qd = u_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sb + h * sh + tq[:, None] * sn + rd[None, :], mask=qd, other=0.0)
        do = tl.load(DO + b * ob + h * oh + tq[:, None] * on + rd[None, :], mask=qd, other=0.0)
        lse = tl.load(ROWS + b * slb + h * slh + tq, mask=u_ok, other=0.0)
        delta = tl.load(ROWS + rows_stride + b * slb + h * slh + tq, mask=u_ok, other=0.0)
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
    tl.store(DK + b * gb + h * gh + tk[:, None] * gn + rd[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV + b * gb + h * gh + tk[:, None] * gn + rd[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_ok)


@triton.jit(do_not_specialize=["M", "Kc"])
def _transpose_kernel(NBR, CSR, M, Kc, KB: tl.constexpr, CHUNK: tl.constexpr):
    """Program (KB key clusters, batch element b): the transposed neighbourhood of those key
    clusters, by counting over the E = M * Kc entries of nbr[b] (contiguous): offsets (entries
    with a smaller key cluster) and, in entry order, the query clusters listing each key
    cluster. Deterministic, and one launch where a torch sort + searchsorted take several."""
    b = tl.program_id(1).to(tl.int64)
    kc = tl.program_id(0) * KB + tl.arange(0, KB)  # (KB,) key clusters; M itself for the end
    E = M * Kc
    SRC = CSR + b * (E + M + 1)
    less = tl.zeros([KB], tl.int32)
    for e0 in range(0, E, CHUNK):
        e = e0 + tl.arange(0, CHUNK)
        val = tl.load(NBR + b * E + e, mask=e < E, other=M).to(tl.int32)
        less += tl.sum((val[:, None] < kc[None, :]).to(tl.int32), 0)
    tl.store(SRC + E + kc, less, mask=kc <= M)  # offsets; offset M is E
    seen = less
    for e0 in range(0, E, CHUNK):
        e = e0 + tl.arange(0, CHUNK)
        val = tl.load(NBR + b * E + e, mask=e < E, other=M).to(tl.int32)
        match = ((val[:, None] == kc[None, :]) & (kc < M)[None, :]).to(tl.int32)  # (CHUNK, KB)
        dest = tl.sum(match * (tl.cumsum(match, 0) - match + seen[None, :]), 1)
        tl.store(SRC + dest, e // Kc, mask=tl.sum(match, 1) > 0)
        seen += tl.sum(match, 0)


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


def _token_views(q, k, v):
    # q, k, v may be strided views (e.g. of a fused qkv projection); the kernels take one set of
    # strides for the three and a unit stride on the head dim, so copy only when that fails.
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _tiles(m: int, D: int, dtype: torch.dtype, num_warps: int | None = None) -> dict:
    """Compile-time tile parameters: these depend on the model, never on batch size or resolution."""
    # Products take the input dtype (tensor cores, float32 accumulation). Triton's interpreter
    # multiplies bfloat16 as raw integers, so there bfloat16 operands are widened to float32 first:
    # exact, since a bfloat16 x bfloat16 product fits a float32 mantissa.
    dot_t = _TL_DTYPE[dtype]
    if dtype == torch.bfloat16 and interpreting():
        dot_t = tl.float32
    block_d = max(16, triton.next_power_of_2(D))
    return dict(
        m=m, D=D, BLOCK_Q=max(16, triton.next_power_of_2(m)), BLOCK_K=BLOCK_K, BLOCK_D=block_d,
        DOT_T=dot_t, DOT_PREC="ieee" if dot_t == tl.float32 else "tf32",
        # One warp per 16-row tile measured fastest on an H100 (docs/BENCHMARKS.md).
        num_warps=num_warps or (1 if block_d <= 64 else 2),
    )


def _ensure(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # Copy only when needed: every avoided no-op call saves host time per launch.
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def attention_forward(
    q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    num_warps: int | None = None,
):
    """Forward kernel. Returns out (B, N, H, D) in q's dtype and lse (B, H, N) float32, base 2.

    ``num_warps`` overrides the default launch width (for ``affmae.bench.attention``).
    """
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    pos, nbr = _ensure(pos, torch.float32), _ensure(nbr)  # (B, N, 2), (B, M, Kc)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _fwd_kernel[(M, B * H)](
        q, k, v, pos, nbr, w, wb, bk, bv, out, lse,
        q.stride(0), q.stride(1), q.stride(2), N * H * D, H * D, D,
        N * 2, 2, M * Kc, Kc, H * N, N,
        H, n_valid, Kc, float(scale),
        **_tiles(m, D, q.dtype, num_warps),
    )
    return out, lse


TRANSPOSE_METHODS = ("auto", "count", "sort")
#: "auto" sorts from this many entries (M * Kc) per image up. Measured on an H200, batch 16
#: (docs/BENCHMARKS.md, session 5): count / sort 10.6 / 47.4 us at M Kc = 824 (512 px stage 2),
#: 38.1 / 49.3 us at 1848 (768 px stage 2), 56.1 / 50.4 us at 2048 (512 px stage 1), 206.4 /
#: 102.2 us at 4608 (768 px stage 1). The count grows as (M Kc)^2 / Kc, the sort's launches
#: cost about 47 us at any of these sizes.
SORT_FROM_ENTRIES = 2048


def auto_transpose_method(nbr: torch.Tensor) -> str:
    """What ``transposed_neighbourhood(nbr, "auto")`` runs: "sort" for large stages (from
    ``SORT_FROM_ENTRIES`` entries per image) or where Triton cannot run, else "count"."""
    big = nbr.shape[1] * nbr.shape[2] >= SORT_FROM_ENTRIES
    return "sort" if big or not (nbr.is_cuda or interpreting()) else "count"


def transposed_neighbourhood(nbr: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """For each key cluster, the query clusters whose neighbourhood lists it (CSR, repeats kept).

    Args:
        nbr: (B, M, Kc) neighbour clusters of each query cluster.
        method: "count" (one Triton launch, a deterministic count, O(M x M Kc) per image: fast
            for small stages, 206 us at 768 px stage 1 on an H200), "sort" (a stable
            ``torch.sort`` of the M Kc entries by key cluster and a ``searchsorted`` for the
            offsets: a few launches, about 47 us on an H200 whatever the size, any device) or
            "auto" (default: "sort" from ``SORT_FROM_ENTRIES`` entries per image up or on a
            device without Triton, else "count"). All give the same result exactly.
    Returns:
        (B, M * Kc + M + 1) int32: per batch element, src (M * Kc query clusters grouped by key
        cluster, ascending within a group) then off (M + 1 offsets): the query clusters of key
        cluster c are src[off[c] : off[c + 1]].
    """
    if method not in TRANSPOSE_METHODS:
        raise ValueError(f"method must be one of {TRANSPOSE_METHODS}, got {method!r}")
    if method == "auto":
        method = auto_transpose_method(nbr)
    B, M, Kc = nbr.shape
    if method == "sort":
        keys = nbr.reshape(B, M * Kc)
        sorted_keys, order = torch.sort(keys, dim=1, stable=True)  # ties keep entry order
        src = torch.div(order, Kc, rounding_mode="floor")  # entry -> its query cluster
        bounds = torch.arange(M + 1, device=nbr.device, dtype=keys.dtype).expand(B, M + 1)
        off = torch.searchsorted(sorted_keys, bounds.contiguous())  # entries with key < c
        return torch.cat([src, off], dim=1).to(torch.int32)
    nbr = _ensure(nbr)
    csr = torch.empty(B, M * Kc + M + 1, device=nbr.device, dtype=torch.int32)
    KB = 16
    _transpose_kernel[(triton.cdiv(M + 1, KB), B)](nbr, csr, M, Kc, KB=KB, CHUNK=512, num_warps=8)
    return csr


def attention_backward(
    do, q, k, v, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    dkdv: str = "two_pass", num_warps: int | None = None, nbr_t: torch.Tensor | None = None,
    dqkv: torch.Tensor | None = None,
):
    """Backward kernels. Returns dq, dk, dv (input dtype) and g (6 H + 2 H D,) float32, the
    packed small gradients, parameter after parameter: d bias_weight (H, 5), d bias_bias (H,),
    d blank_k (H, D), d blank_v (H, D) (``unpack_param_grads``).

    ``dkdv``: "two_pass" (key-major second kernel) or "atomic" (float32 atomics in pass 1).
    ``num_warps`` overrides the default launch width (for ``affmae.bench.attention``).
    ``nbr_t``: ``transposed_neighbourhood(nbr)`` if the caller has it (the blocks of a stage share
    one neighbourhood, so the model builds it once per stage); built here otherwise.
    ``dqkv``: a (B, N, 3, H, D) tensor in q's dtype, unit stride on the head dim, that the kernels
    write dq, dk, dv into (returned as its three slices) instead of three new tensors; see
    ``attention_backward_packed``.
    """
    if dkdv not in DKDV_MODES:
        raise ValueError(f"dkdv must be one of {DKDV_MODES}, got {dkdv!r}")
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M, Kc = nbr.shape[1:]
    do = _ensure(do, q.dtype)  # (B, N, H, D), the layout of out
    pos, nbr = _ensure(pos, torch.float32), _ensure(nbr)  # (B, N, 2), (B, M, Kc)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    dev = q.device
    tiles = _tiles(m, D, q.dtype, num_warps)
    atomic = dkdv == "atomic"

    if dqkv is None:
        dq = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
    else:
        if tuple(dqkv.shape) != (B, N, 3, H, D) or dqkv.dtype != q.dtype or dqkv.stride(-1) != 1:
            raise ValueError(f"dqkv must be ({B}, {N}, 3, {H}, {D}) {q.dtype} with a unit stride on "
                             f"the head dim, got {tuple(dqkv.shape)} {dqkv.dtype} strides {dqkv.stride()}")
        dq, dk, dv = dqkv.unbind(2)
    # dq, dk, dv share strides: all contiguous (B, N, H, D), or all slices of dqkv.
    strides = (*q.stride()[:3], N * H * D, H * D, D, *dq.stride()[:3], N * 2, 2)
    rows = torch.empty(2, B, H, N, device=dev, dtype=torch.float32)  # corrected lse, delta
    # a column per program
    parts = torch.empty(6 * H + 2 * H * D, B * M, device=dev, dtype=torch.float32)
    # float32 dK, dV accumulators for the atomic mode (unused otherwise)
    dkv32 = torch.zeros(2, B, N, H, D, device=dev, dtype=torch.float32) if atomic else parts
    _bwd_q_kernel[(M, B * H)](
        q, k, v, do, pos, nbr, w, wb, bk, bv, lse, rows, dq, parts, dkv32,
        *strides, M * Kc, Kc, H * N, N, B * H * N,
        H, N, M, n_valid, Kc, float(scale),
        SINGLE_TILE=Kc * m <= BLOCK_K, ATOMIC=atomic, **tiles,
    )
    if atomic:
        if dqkv is None:
            dk, dv = dkv32[0].to(q.dtype), dkv32[1].to(q.dtype)
        else:  # the same rounding as ``.to``, into dqkv's slices
            dk.copy_(dkv32[0])
            dv.copy_(dkv32[1])
    else:
        if nbr_t is None:
            csr = transposed_neighbourhood(nbr)
        else:
            if tuple(nbr_t.shape) != (B, M * Kc + M + 1) or nbr_t.dtype != torch.int32:
                raise ValueError(f"nbr_t must be ({B}, {M * Kc + M + 1}) int32 "
                                 f"(transposed_neighbourhood(nbr)), got {tuple(nbr_t.shape)} "
                                 f"{nbr_t.dtype}")
            csr = _ensure(nbr_t)
        if dqkv is None:
            dk = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
            dv = torch.empty(B, N, H, D, device=dev, dtype=q.dtype)
        _bwd_kv_kernel[(M, B * H)](
            q, k, v, do, pos, csr, w, wb, rows, dk, dv,
            *strides, H * N, N, B * H * N,
            H, M, Kc, n_valid, float(scale),
            **tiles,
        )
    return dq, dk, dv, parts.sum(-1)  # (6 H + 2 H D,)


def check_packed(qkv: torch.Tensor) -> None:
    """Raise unless ``qkv`` is a packed (B, N, 3, H, D) tensor."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D), got shape {tuple(qkv.shape)}")


def attention_backward_packed(
    do, qkv, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    dkdv: str = "two_pass", num_warps: int | None = None, nbr_t: torch.Tensor | None = None,
):
    """``attention_backward`` for q, k, v = ``qkv.unbind(2)`` of a packed (B, N, 3, H, D) ``qkv``
    (a fused projection's output). Returns dqkv (B, N, 3, H, D), contiguous, in qkv's dtype, and g.

    The kernels write dq, dk, dv straight into dqkv's slices, so dqkv is the gradient of the
    packed tensor as it is; three separate gradients would need autograd's ``UnbindBackward``
    to stack them (one copy kernel per attention layer). Same kernels, same values.
    """
    check_packed(qkv)
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    *_, g = attention_backward(
        do, *qkv.unbind(2), lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
        dkdv=dkdv, num_warps=num_warps, nbr_t=nbr_t, dqkv=dqkv,
    )
    return dqkv, g


def unpack_param_grads(g: torch.Tensor, bias_weight, bias_bias, blank_k, blank_v):
    """Split the packed (6 H + 2 H D,) float32 gradient of ``attention_backward`` into the four
    parameter gradients, in the parameters' dtypes: contiguous views for float32 parameters
    (autograd then keeps them as the ``.grad``s without a copy)."""
    H, D = blank_k.shape
    w, wb, bk, bv = g.split([5 * H, H, H * D, H * D])
    return (w.view(H, 5).to(bias_weight.dtype), wb.to(bias_bias.dtype),
            bk.view(H, D).to(blank_k.dtype), bv.view(H, D).to(blank_v.dtype))
