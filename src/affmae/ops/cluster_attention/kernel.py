"""Cluster attention, Triton kernels: Flash-style forward and backward (DESIGN section 3).

Computes exactly the function of ``reference.py`` (AFF cluster attention, Ziwen et al. 2023,
with the AFFMAE paper's streaming-softmax kernel, sec. "Flash-style cluster attention"):
per head, softmax over [the Kc * m keys of the neighbour clusters ; one learned blank key] of
q.k * scale + bias(p_k - p_q), applied to [neighbour values ; blank value].

How it is computed:
0. Groups. Clusters are ordered along a space-filling curve, so G consecutive clusters share
   most of their neighbours (at 512 px, stage 1, the 16 neighbour slots of 2 consecutive
   clusters name about 10.5 distinct clusters). A program takes G clusters (G = 16 // m, so
   the G * m queries fill a 16-row tensor-core tile: G = 2 for m = 8) and streams over the
   *union* of their neighbourhoods; one bit per (union entry, row cluster) masks the logits of
   keys a query's cluster does not list. ``group_neighbourhood`` builds that structure (one
   Triton launch, about 3 us) and, transposed, the one of the key-major pass (groups of key
   clusters, entries the query clusters listing them; a count or a sort, 7.5-86 us on an
   H200 as "auto" picks); a stage's blocks share both (``Clustering.attention_groups``). Against one program
   per cluster (an 8-row tile padded to 16 against its own 64 gathered keys) this removes the
   padding rows and gathers each key once per group: 1.1-1.4x faster forward and backward
   (docs/BENCHMARKS.md, session 12). Larger groups lose: their unions are mostly masked.
1. Forward, one program per (group, batch * head): the query tile times a gathered key tile
   (BLOCK_K = 32 keys of the union) is one ``tl.dot``. The blank key/value is the initial
   state of the streaming softmax (running max = blank logit, running sum = 1, accumulator =
   blank value), so no row is ever empty. Logits, bias, softmax and accumulation are float32;
   the bias is computed in the kernel from the two positions and the (H, 5) + (H,) weights:
   no table, no (B, H, N, K) scores or biases in memory. Saved: output and the row log-sum-exp.
   Each logit starts from one offset that holds both the membership mask and the bias's
   constant term (``_offsets``: picked per column, then by row), and the bias adds four fused
   multiply-adds after one reciprocal square root (``_add_bias``); columns past the union and
   rows past the group are neutralised by their mask bits and log-sum-exp, so the gathers and
   the per-logit work carry no masks (about 26 instructions per logit and thread in the
   forward's loop, from 38: ``scripts/sass_count.py``, docs/BENCHMARKS.md sessions 18-19).
2. Backward pass 1, one program per (query group, batch * head), in one sweep over the union:
   P from the saved log-sum-exp, renormalised per row in float32 (so sum_j dS_j = 0 holds to
   float32 rounding even when huge logits make the stored log-sum-exp coarse), and delta =
   sum_j P_j dP_j from that P (not rowsum(dO * O) with O rounded to the input dtype: the
   bias-weight gradient sums dS over all query-key pairs, where that rounding does not cancel
   and gave ~10x the reference's error). Both need the row sums before dS exists, so the sweep
   accumulates sums the end combines: with p the P from the saved log-sum-exp and c = dO . O
   (O as stored: within its rounding of delta), S0 = sum p, S1 = sum p (dP - c),
   A = sum p (dP - c) k and Bk = sum p k; then
   e = S1 / S0 (= delta - c), dS = p / S0 * ((dP - c) - e), dQ = (A - e Bk) / S0. Subtracting c
   before the half-precision product A keeps its rounding that of dS itself (c is within the
   output's rounding of delta, so e is small and Bk's rounding hardly counts). The bias bias's
   gradient, a row's sum of dS over the union, is exactly -dS of the blank key. (Until session
   13 the pass swept twice: row sums first, then dS.)
   dQ in registers; the gradients of the bias bias and the blank key / value reduced over the
   tile and written as one partial column per program ((H + 2 H D, B * nG) floats; never per
   query-key),
   parameter-major, so each parameter's gradient is a contiguous piece of the sum. Pass 2's
   first programs sum the columns (in a fixed order: deterministic), which saves a reduction
   launch and its host time.
3. Backward pass 2 (dK, dV), one program per (key group, batch * head) over the transposed
   structure: the group's keys are the tile rows, gathered incoming queries the columns; dK /
   dV accumulate in registers and are written once (float32 atomics from pass 1 were measured
   1.9-2.7x slower on an H100 and are gone). With pass 1's corrected log-sum-exp and delta its
   dS is exact, so the bias weights' gradient (dS times each of the five bias features, summed
   over all pairs) is summed here: five row sums per tile, one partial per program and weight,
   which one torch reduction adds up after the pass. In pass 1, before delta is known, each
   feature needed two row sums (p f and p (dP - c) f): ten per tile, 40% of its loop
   (session 19 moved them).

Repeated neighbours (Kc > M, the global case) are kept: the j-th repeat of a cluster in a list
is its own union entry, so every key counts as often as the reference counts it.

Supported: q, k, v float32, bfloat16 or float16 (one dtype; output in it), head dim 16..128 (any,
padded to a power of two internally), any m (tokens per cluster) up to 64, any Kc. Sizes are
runtime arguments that are never specialised (``do_not_specialize``); tensor strides are
specialised only the way Triton always does, on divisibility by 16 (alignment, which vectorised
loads need), so at most a couple of variants ever compile and a new batch size or resolution
does not recompile. With TRITON_INTERPRET=1 the same kernels run on CPU tensors through
Triton's interpreter (tests).

Differences from the reference (all within rounding): both matrix products accumulate in float32
(the reference rounds q.k to the input dtype before adding the bias); the blank key enters in
float32; float32 inputs use IEEE (not TF32) products. Positions get no gradient.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from affmae.ops.dispatch import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
MAX_CLUSTER_SIZE = 64
BLOCK_K = 32  # union keys (forward, pass 1) or gathered queries (pass 2) per tile
GROUP_ROWS = 16  # a group's queries fill this many tile rows: G = GROUP_ROWS // m (at least 1)
MAX_GROUP = 16  # the membership masks are int32 bit sets over a group's clusters
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SIZES = ["H", "M", "n_valid", "nG", "CAP"]  # never specialised (see the module docstring)
TRANSPOSE_METHODS = ("auto", "count", "sort")
#: "auto" sorts from this many entries (M * Kc) per image up. On an H200 (session 12) the count
#: took 7.5-35 us up to 2,048 entries (every 512 px stage; the sort 39-43 us there) and 112 us at
#: 4,608 (768 px stage 1; the sort 86 us); the count grows as entries^2, so they cross near 2,300.
SORT_FROM_ENTRIES = 2304


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
# Group structures: see ``group_neighbourhood``. Token tensors: q, k, v share strides
# (sb, sn, sh); out and dO are contiguous (B, N, H, D) with
# strides (ob, on, oh); dq, dk, dv share strides (gb, gn, gh): contiguous (B, N, H, D) too, or
# the three slices of one packed (B, N, 3, H, D) gradient. The head dim has stride 1 everywhere.
# ----------------------------------------------------------------------------------------------


#: The rows' log-sum-exp take log2 through the GPU's special-function unit (``lg2.approx``,
#: libdevice's ``fast_log2f``: one instruction, within 2^-22 of the exact value), not
#: ``tl.log2``'s accurate software routine (about 30 instructions per value: 98 of the
#: forward's 587 instructions outside its loop, ``scripts/sass_count.py``). Triton's interpreter
#: has no libdevice, so under it the kernels keep ``tl.log2``.
_FAST_LOG2 = tl.constexpr(not interpreting())


@triton.jit
def _log2(x):
    if _FAST_LOG2:
        y = libdevice.fast_log2f(x)
    else:
        y = tl.log2(x)
    return y


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
def _add_bias(t, dx, dy, w0, w1, w2, w3, w4):
    """t + the relative-position bias of offsets (dx, dy) = p_key - p_query, without its constant
    term: Linear(5 -> 1) of (dx, dy, r, dx/r, dy/r), as dx (w0 + w3 / r) + dy (w1 + w4 / r) + w2 r,
    four fused multiply-adds after the one special-function op. r2 carries 1e-30 (folded into
    its fused multiply-adds, so it costs no instruction), which rounds away for any r2 above
    about 1e-23 and keeps 1/r finite (1e15) at r = 0, a query and a key at one position: there
    both quotients are 0, as the reference defines them, and r is 1e-15 for the reference's 0.

    Returns the sum and the two features the bias-weight gradient needs (r, 1/r)."""
    r2 = dx * dx + (dy * dy + 1.0e-30)
    inv_r = tl.rsqrt(r2)
    r = r2 * inv_r
    t = w2 * r + t
    t = dx * (w3 * inv_r + w0) + t
    t = dy * (w4 * inv_r + w1) + t
    return t, r, inv_r


@triton.jit
def _offsets(bits, r, wb, G: tl.constexpr):
    """The (rows, columns) tile every logit starts from: the bias's constant term wb where the
    row's cluster lists the column's key (bit r of the column's membership bits), else the
    masked logit. For G <= 2 it is picked per column, then by row (at most one select per
    logit); larger groups test the bit per logit."""
    if G == 1:
        off = tl.where((bits & 1) != 0, wb, -1.0e30)[None, :] + tl.zeros_like(r).to(tl.float32)[:, None]
    elif G == 2:
        f0 = tl.where((bits & 1) != 0, wb, -1.0e30)
        f1 = tl.where((bits & 2) != 0, wb, -1.0e30)
        off = tl.where((r == 1)[:, None], f1[None, :], f0[None, :])
    else:
        off = tl.where(((bits[None, :] >> r[:, None]) & 1) != 0, wb, -1.0e30)
    return off


@triton.jit
def _union_tile(GRP, sgb, b, u0, start, Kn, nG, CAP, m: tl.constexpr, BLOCK_K: tl.constexpr):
    """Flat index t = start .. start + BLOCK_K over a group's union entries (m tokens each):
    token index and membership mask of each column. Columns past the union get mask 0 and a
    token of cluster 0, so loads through them need no mask."""
    t = start + tl.arange(0, BLOCK_K)
    t_ok = t < Kn
    e = GRP + b * sgb + 2 * nG + u0 + t // m
    cl = tl.load(e, mask=t_ok, other=0)
    bits = tl.load(e + CAP, mask=t_ok, other=0)
    return cl * m + t % m, bits


@triton.jit
def _rows(base, rows, stride, rd, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gather rows (valid token indices) of one head: (len(rows), BLOCK_D), zero past D."""
    ptr = base + rows[:, None] * stride + rd[None, :]
    if D == BLOCK_D:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=(rd < D)[None, :], other=0.0)
    return x


@triton.jit(do_not_specialize=_SIZES)
def _fwd_kernel(
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
    # The group's union first: its bounds start the kernel's longest chain of dependent loads
    # (bounds, then union entries, then the gathered keys), so their latency overlaps the
    # loads below.
    u0 = tl.load(GRP + b * sgb + g)
    Kn = (tl.load(GRP + b * sgb + nG + g) - u0) * m

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
    # The union entries (token indices, membership bits) of each tile are loaded one iteration
    # ahead and carried, so the iteration that issues a tile's gathers waits for no index load
    # first (forward -2.7%, pass 1 -2.2% on an H100, session 20). See NUM_STAGES for when the
    # gathers themselves are issued.
    tk, bits = _union_tile(GRP, sgb, b, u0, 0, Kn, nG, CAP, m, BLOCK_K)
    for start in range(0, Kn, BLOCK_K):
        tk_next, bits_next = _union_tile(GRP, sgb, b, u0, start + BLOCK_K, Kn, nG, CAP, m, BLOCK_K)
        bits = tl.where(tk < n_valid, bits, 0)  # padded keys: masked for every row
        pkx = tl.load(POS + b * spb + tk * spn)
        pky = tl.load(POS + b * spb + tk * spn + 1)
        k = _rows(K + b * sb + h * sh, tk, sn, rd, D, BLOCK_D)
        v = _rows(V + b * sb + h * sh, tk, sn, rd, D, BLOCK_D)
        s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
        s, _r, _ir = _add_bias(s * qk_scale + _offsets(bits, r, wb, G), pkx[None, :] - pqx[:, None],
                               pky[None, :] - pqy[:, None], w0, w1, w2, w3, w4)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), v.to(DOT_T), input_precision=DOT_PREC)
        m_i = m_new
        tk, bits = tk_next, bits_next

    out = acc * (1.0 / l_i)[:, None]
    tl.store(O + b * ob + h * oh + tq[:, None] * on + rd[None, :],
             out.to(O.dtype.element_ty), mask=q_row[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + tq, m_i + _log2(l_i), mask=q_row)


@triton.jit
def _bwd_tile(q, do, lse, pqx, pqy, r, K, V, POS, tk, bits, b, h, n_valid,
              sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd,
              G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_T: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile (tokens tk, membership bits) of a group's union: P (before the row
    correction), dP and the keys. Rows past the group have lse = +1e30, so their P is 0."""
    bits = tl.where(tk < n_valid, bits, 0)
    pkx = tl.load(POS + b * spb + tk * spn)
    pky = tl.load(POS + b * spb + tk * spn + 1)
    k = _rows(K + b * sb + h * sh, tk, sn, rd, D, BLOCK_D)
    v = _rows(V + b * sb + h * sh, tk, sn, rd, D, BLOCK_D)
    s = tl.dot(q.to(DOT_T), tl.trans(k.to(DOT_T)), input_precision=DOT_PREC)
    dp = tl.dot(do.to(DOT_T), tl.trans(v.to(DOT_T)), input_precision=DOT_PREC)
    s, _r, _ir = _add_bias(s * qk_scale + _offsets(bits, r, wb, G), pkx[None, :] - pqx[:, None],
                           pky[None, :] - pqy[:, None], w0, w1, w2, w3, w4)
    p = tl.exp2(s - lse[:, None])
    return p, dp, k


@triton.jit(do_not_specialize=_SIZES)
def _bwd_q_kernel(
    Q, K, V, DO, O, POS, GRP, W, WB, BK, BV, LSE, ROWS, DQ, GP,
    sb, sn, sh, ob, on, oh, gb, gn, gh, spb, spn, sgb, slb, slh, rows_stride,
    H, M, n_valid, nG, CAP, scale,
    m: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One sweep over the union (module docstring, backward pass 1): with p the tile's P from the
    # saved log-sum-exp (not yet renormalised) and c = dO . O per row (O as stored), accumulate
    # S0 = sum p, S1 = sum p (dP - c), A = sum p (dP - c) k and Bk = sum p k; at the end
    # e = S1 / S0, delta = c + e and dS = p / S0 * ((dP - c) - e), so dQ = (A - e Bk) / S0.
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    qk_scale = scale * 1.4426950408889634
    u0 = tl.load(GRP + b * sgb + g)  # first, as in the forward: the longest load chain starts here
    Kn = (tl.load(GRP + b * sgb + nG + g) - u0) * m

    rq = tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    r = rq // m
    q_row = (rq < G * m) & (g * G + r < M)
    d_ok = rd < D
    qd_ok = q_row[:, None] & d_ok[None, :]
    tq = g * (G * m) + rq
    q = tl.load(Q + b * sb + h * sh + tq[:, None] * sn + rd[None, :], mask=qd_ok, other=0.0)
    do = tl.load(DO + b * ob + h * oh + tq[:, None] * on + rd[None, :], mask=qd_ok, other=0.0)
    o = tl.load(O + b * ob + h * oh + tq[:, None] * on + rd[None, :], mask=qd_ok, other=0.0)
    c = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # delta to the output's rounding
    lse = tl.load(LSE + b * slb + h * slh + tq, mask=q_row, other=1.0e30)  # P = 0 past the group
    pqx = tl.load(POS + b * spb + tq * spn, mask=q_row, other=0.0)
    pqy = tl.load(POS + b * spb + tq * spn + 1, mask=q_row, other=0.0)
    w0, w1, w2, w3, w4, wb = _bias_weights(W, WB, h)

    # The blank key / value.
    bk = tl.load(BK + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    bv = tl.load(BV + h * D + rd, mask=d_ok, other=0.0).to(tl.float32)
    p_b = tl.exp2(tl.sum(q.to(tl.float32) * bk[None, :], 1) * qk_scale - lse)
    p_b = tl.where(q_row, p_b, 0.0)
    dpc_b = tl.sum(do.to(tl.float32) * bv[None, :], 1) - c
    s0 = p_b
    s1 = p_b * dpc_b

    acc_a = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    acc_b = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    tk, bits = _union_tile(GRP, sgb, b, u0, 0, Kn, nG, CAP, m, BLOCK_K)  # one tile ahead (forward)
    for start in range(0, Kn, BLOCK_K):
        tk_next, bits_next = _union_tile(GRP, sgb, b, u0, start + BLOCK_K, Kn, nG, CAP, m, BLOCK_K)
        p, dp, k = _bwd_tile(
            q, do, lse, pqx, pqy, r, K, V, POS, tk, bits, b, h, n_valid,
            sb, sn, sh, spb, spn, qk_scale, w0, w1, w2, w3, w4, wb, rd,
            G, D, BLOCK_D, DOT_T, DOT_PREC)
        tk, bits = tk_next, bits_next
        pd = p * (dp - c[:, None])
        s0 += tl.sum(p, 1)
        s1 += tl.sum(pd, 1)
        acc_a += tl.dot(pd.to(DOT_T), k.to(DOT_T), input_precision=DOT_PREC)
        acc_b += tl.dot(p.to(DOT_T), k.to(DOT_T), input_precision=DOT_PREC)

    inv_sum = tl.where(q_row, 1.0 / tl.where(q_row, s0, 1.0), 0.0)
    e = s1 * inv_sum  # delta - c
    ds_b = p_b * inv_sum * (dpc_b - e)
    dq = (acc_a - e[:, None] * acc_b) * inv_sum[:, None] + ds_b[:, None] * bk[None, :]
    tl.store(DQ + b * gb + h * gh + tq[:, None] * gn + rd[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_ok)
    tl.store(ROWS + b * slb + h * slh + tq, lse + _log2(tl.where(q_row, s0, 1.0)), mask=q_row)
    tl.store(ROWS + rows_stride + b * slb + h * slh + tq, c + e, mask=q_row)
    # GP: (H + 2 H D, B * nG), one column per program, parameter-major: the gradients of the
    # bias bias, the blank key and the blank value (the bias weights' come from pass 2). The
    # bias bias's gradient is the row's sum of dS over the union keys, which is exactly -dS of
    # the blank key (a row's dS sum to 0).
    P = (tl.num_programs(1) // H) * nG
    col = GP + (b * nG + g)
    tl.store(col + h * P, tl.sum(-ds_b, 0))
    # q and dO again (cache hits): keeping their float32 copies live through the sweep for
    # these two sums cost registers, and so occupancy.
    q = tl.load(Q + b * sb + h * sh + tq[:, None] * sn + rd[None, :], mask=qd_ok, other=0.0,
                cache_modifier=".cg")
    do = tl.load(DO + b * ob + h * oh + tq[:, None] * on + rd[None, :], mask=qd_ok, other=0.0,
                 cache_modifier=".cg")
    tl.store(col + (H + h * D + rd) * P,
             tl.sum(ds_b[:, None] * q.to(tl.float32), 0) * scale, mask=d_ok)
    tl.store(col + (H + (H + h) * D + rd) * P,
             tl.sum((p_b * inv_sum)[:, None] * do.to(tl.float32), 0), mask=d_ok)


@triton.jit(do_not_specialize=_SIZES + ["n_param", "n_part"])
def _bwd_kv_kernel(
    Q, K, V, DO, POS, GRP, W, WB, ROWS, DK, DV, GP, GSUM, GW,
    sb, sn, sh, ob, on, oh, gb, gn, gh, spb, spn, sgb, slb, slh, rows_stride,
    H, M, n_valid, nG, CAP, scale, n_param, n_part,
    m: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Key-major: program (group of G key clusters, batch * head) streams over the union of the
    # query clusters listing any of them (transposed group structure); S, P, dP are keys x queries.
    # With P and delta corrected by pass 1, dS here is exact, so the bias weights' gradient
    # (sum of dS times each bias feature over all query-key pairs) is summed here: one partial
    # per program and weight into GW.
    g = tl.program_id(0)
    bh = tl.program_id(1)
    # First, pass 1's per-program partial parameter gradients GP (n_param, n_part) summed into
    # GSUM (n_param,): rows RED_R at a time, program after program (the first programs of the
    # grid, or every program taking several blocks when the grid is small), columns in a fixed
    # order, so the sums are deterministic. This saves the backward a reduction launch.
    RED_R: tl.constexpr = 16
    RED_C: tl.constexpr = 64
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    for r0 in range((bh * nG + g) * RED_R, n_param, n_prog * RED_R):
        pr = r0 + tl.arange(0, RED_R)
        part = tl.zeros([RED_R, RED_C], tl.float32)
        for c0 in range(0, n_part, RED_C):
            pc = c0 + tl.arange(0, RED_C)
            part += tl.load(GP + pr[:, None].to(tl.int64) * n_part + pc[None, :],
                            mask=(pr[:, None] < n_param) & (pc[None, :] < n_part), other=0.0)
        tl.store(GSUM + pr, tl.sum(part, 1), mask=pr < n_param)
    b = (bh // H).to(tl.int64)
    h = bh % H
    qk_scale = scale * 1.4426950408889634
    u0 = tl.load(GRP + b * sgb + g)  # first, as in the forward: the longest load chain starts here
    n_in = (tl.load(GRP + b * sgb + nG + g) - u0) * m

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

    dk = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    f0 = tl.zeros([BLOCK_Q], tl.float32)  # sums of dS times dx, dy, r, dx / r, dy / r per key
    f1 = tl.zeros([BLOCK_Q], tl.float32)
    f2 = tl.zeros([BLOCK_Q], tl.float32)
    f3 = tl.zeros([BLOCK_Q], tl.float32)
    f4 = tl.zeros([BLOCK_Q], tl.float32)
    # (Here the union entries are loaded in the iteration that uses them: carried one tile ahead
    # as in the forward, they cost this kernel 126 spill instructions at its register cap.)
    for start in range(0, n_in, BLOCK_K):
        tq, bits = _union_tile(GRP, sgb, b, u0, start, n_in, nG, CAP, m, BLOCK_K)
        q = _rows(Q + b * sb + h * sh, tq, sn, rd, D, BLOCK_D)
        do = _rows(DO + b * ob + h * oh, tq, on, rd, D, BLOCK_D)
        lse = tl.load(ROWS + b * slb + h * slh + tq)
        delta = tl.load(ROWS + rows_stride + b * slb + h * slh + tq)
        pqx = tl.load(POS + b * spb + tq * spn)
        pqy = tl.load(POS + b * spb + tq * spn + 1)
        dx = pkx[:, None] - pqx[None, :]
        dy = pky[:, None] - pqy[None, :]
        s = tl.dot(k.to(DOT_T), tl.trans(q.to(DOT_T)), input_precision=DOT_PREC)
        s, rr, inv_r = _add_bias(s * qk_scale + _offsets(bits, r, wb, G), dx, dy, w0, w1, w2, w3, w4)
        p = tl.exp2(s - lse[None, :])
        dv += tl.dot(p.to(DOT_T), do.to(DOT_T), input_precision=DOT_PREC)
        dp = tl.dot(v.to(DOT_T), tl.trans(do.to(DOT_T)), input_precision=DOT_PREC)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(DOT_T), q.to(DOT_T), input_precision=DOT_PREC)
        f0 += tl.sum(ds * dx, 1)
        f1 += tl.sum(ds * dy, 1)
        f2 += tl.sum(ds * rr, 1)
        ds = ds * inv_r
        f3 += tl.sum(ds * dx, 1)
        f4 += tl.sum(ds * dy, 1)

    # Padded keys (past n_valid) take part in no logit: their rows above are not masked (that
    # would cost a select per logit), so their gradients are zeroed here.
    dk = tl.where(k_ok[:, None], dk, 0.0)
    dv = tl.where(k_ok[:, None], dv, 0.0)
    # GW: (5 H, B * nG), one column per program, parameter-major (as GP).
    col = GW + (b * nG + g)
    P = (tl.num_programs(1) // H) * nG
    tl.store(col + (h * 5) * P, tl.sum(tl.where(k_ok, f0, 0.0), 0))
    tl.store(col + (h * 5 + 1) * P, tl.sum(tl.where(k_ok, f1, 0.0), 0))
    tl.store(col + (h * 5 + 2) * P, tl.sum(tl.where(k_ok, f2, 0.0), 0))
    tl.store(col + (h * 5 + 3) * P, tl.sum(tl.where(k_ok, f3, 0.0), 0))
    tl.store(col + (h * 5 + 4) * P, tl.sum(tl.where(k_ok, f4, 0.0), 0))
    tl.store(DK + b * gb + h * gh + tk[:, None] * gn + rd[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV + b * gb + h * gh + tk[:, None] * gn + rd[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_ok)


# ----------------------------------------------------------------------------------------------
# Group structures
# ----------------------------------------------------------------------------------------------


def num_groups(M: int, G: int) -> int:
    return -(-M // G)


def groups_width(M: int, Kc: int, G: int, transpose: bool = False) -> int:
    """Row length of a group structure: [start nG][end nG][clusters CAP][masks CAP], plus one
    spare 0 for the key-major one: its width is odd and the forward one's even, so the two can
    never be mistaken for each other (their CAPs are equal when G divides M)."""
    nG = num_groups(M, G)
    return 2 * nG + (2 * M * Kc + 1 if transpose else 2 * nG * G * Kc)


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
def _csr_groups_kernel(VAL, TMASK, OUT, E, Kc, nG, CAP, WIDTH, KB: tl.constexpr, CHUNK: tl.constexpr):
    """Program (KB key groups, batch element b): the entries with VAL == group, in entry order,
    by counting (``kernel._transpose_kernel`` with groups for clusters and a sentinel nG):
    start / end of each group, the listing row (entry // Kc) and its mask."""
    b = tl.program_id(1).to(tl.int64)
    kc = tl.program_id(0) * KB + tl.arange(0, KB)  # (KB,) key groups; nG itself for the end
    base = OUT + b * WIDTH
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
        (CAP)][masks (CAP)] (and, transposed, one spare 0); group g's entries are start[g] ..
        end[g]. Entry e names a cluster (transposed: a query cluster) and a mask whose bit i
        says that cluster g * G + i of the group lists it (transposed: is listed by it).
        Deterministic.
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
        out.zero_()  # slots past the last entry read 0, as from the sort below
        KB = 16
        _csr_groups_kernel[(triton.cdiv(nG + 1, KB), B)](val, tmask, out, E, Kc, nG, E, out.shape[1],
                                                          KB=KB, CHUNK=512, num_warps=8)
        return out
    sval, order = torch.sort(val, dim=1, stable=True)
    bounds = torch.arange(nG + 1, device=nbr.device, dtype=torch.int32).expand(B, nG + 1)
    off = torch.searchsorted(sval, bounds.contiguous()).to(torch.int32)  # (B, nG + 1)
    used = torch.arange(E, device=nbr.device) < off[:, -1:]  # entries past the last one: 0
    rows = torch.where(used, torch.div(order, Kc, rounding_mode="floor"), 0).to(torch.int32)
    return torch.cat([off[:, :-1], off[:, 1:], rows, torch.where(used, tmask.gather(1, order), 0),
                      torch.zeros_like(off[:, :1])], dim=1)


def check_groups(grp: torch.Tensor, B: int, M: int, Kc: int, G: int, transpose: bool,
                 what: str) -> torch.Tensor:
    width = groups_width(M, Kc, G, transpose)
    if tuple(grp.shape) != (B, width) or grp.dtype != torch.int32:
        raise ValueError(f"{what} must be ({B}, {width}) int32 (group_neighbourhood with G={G}, "
                         f"transpose={transpose}), got {tuple(grp.shape)} {grp.dtype}")
    return _ensure(grp)


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


def group_size(m: int) -> int:
    """Clusters per program for cluster size m: enough to fill a 16-row tile (2 for m = 8)."""
    return max(1, min(MAX_GROUP, GROUP_ROWS // m))


#: Register cap (Triton's ``maxnreg``) per kernel: "fwd", "q" (backward pass 1), "kv" (pass 2);
#: None leaves the choice to the compiler. One-warp programs: each of an SM's four schedulers
#: has a quarter of its 64 K registers (512 per thread lane), so a cap of 168 lets it hold 3
#: warps, 128 lets it hold 4. Uncapped, ptxas gives pass 1 about 240 registers and pass 2 about
#: 190 (2 warps each); at 168 pass 1 has no spills and pass 2 four spill instructions. On an
#: H100 (session 19, summed over aff_small's 8 stages, one machine) pass 1 took 418 us capped
#: against 461 uncapped and pass 2 315 against 341. The forward (122 registers, 4 warps) gained
#: nothing from a cap (session 18).
MAXNREG: dict[str, int | None] = {"fwd": None, "q": 168, "kv": 168}


#: Software-pipelining stages per kernel (Triton's ``num_stages``). Two, not Triton's default
#: three: faster for all three kernels at every aff_small stage on an H200 (forward 9%, pass 1
#: 2%, pass 2 10% summed over the stages; docs/bench/tile_sweep_h200_session14.txt), and less
#: shared memory. With two, a tile's gathers are issued after the previous tile's products (one
#: shared-memory buffer) and waited for at the top of the next iteration: 14-18% of the kernels'
#: stall samples (Nsight Compute, session 20). Three stages overlap them with the products but
#: cost more instructions and, in pass 1, spills: still 1-2% slower in session 20 (H100).
NUM_STAGES: dict[str, int] = {"fwd": 2, "q": 2, "kv": 2}


def _tiles(m: int, D: int, dtype: torch.dtype, G: int, block_k: int = BLOCK_K,
           num_warps: int | None = None, kernel: str = "fwd") -> dict:
    """Compile-time tile parameters: these depend on the model, never on batch size or resolution.
    A new dict each call (callers may change it); computed once per distinct argument set."""
    tiles = dict(_tile_items(m, D, dtype, G, block_k, num_warps, interpreting()))
    tiles["num_stages"] = NUM_STAGES[kernel]
    if MAXNREG[kernel] and not interpreting():
        tiles["maxnreg"] = MAXNREG[kernel]
    return tiles


@functools.lru_cache(maxsize=256)
def _tile_items(m: int, D: int, dtype: torch.dtype, G: int, block_k: int, num_warps: int | None,
                interpret: bool) -> tuple:
    # Products take the input dtype (tensor cores, float32 accumulation). Triton's interpreter
    # multiplies bfloat16 as raw integers, so there bfloat16 operands are widened to float32 first:
    # exact, since a bfloat16 x bfloat16 product fits a float32 mantissa.
    dot_t = _TL_DTYPE[dtype]
    if dtype == torch.bfloat16 and interpret:
        dot_t = tl.float32
    block_d = max(16, triton.next_power_of_2(D))
    block_q = max(16, triton.next_power_of_2(G * m))
    return tuple(dict(
        m=m, D=D, G=G, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d,
        DOT_T=dot_t, DOT_PREC="ieee" if dot_t == tl.float32 else "tf32",
        # One warp per 16 rows (one warp per 16-row tile measured fastest on an H100).
        num_warps=num_warps or (block_q // 16) * (1 if block_d <= 64 else 2),
    ).items())


def _ensure(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # Copy only when needed: every avoided no-op call saves host time per launch.
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _structures(nbr, m, G, grp, grp_t, need_t: bool):
    """The forward (and, if ``need_t``, key-major) group structures: given ones checked, missing
    ones built."""
    B, M, Kc = nbr.shape
    G = group_size(m) if G is None else G
    grp = group_neighbourhood(nbr, G) if grp is None else check_groups(grp, B, M, Kc, G, False, "grp")
    if need_t:
        grp_t = (group_neighbourhood(nbr, G, transpose=True) if grp_t is None
                 else check_groups(grp_t, B, M, Kc, G, True, "grp_t"))
    return G, grp, grp_t


def attention_groups(nbr: torch.Tensor, m: int, transpose: bool = False) -> torch.Tensor:
    """``group_neighbourhood(nbr, group_size(m), transpose)``: the structure the launchers build
    when not given one (callers that run several attention calls over one neighbourhood build
    it once)."""
    return group_neighbourhood(nbr, group_size(m), transpose)


def attention_forward(
    q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    grp: torch.Tensor | None = None, group: int | None = None, block_k: int = BLOCK_K,
    num_warps: int | None = None,
):
    """Forward kernel. Returns out (B, N, H, D) in q's dtype and lse (B, H, N) float32, base 2.

    ``grp``: ``attention_groups(nbr, m)`` if the caller has it (built here otherwise).
    ``group``, ``block_k``, ``num_warps``: override the tiling (clusters per program, keys per
    tile, launch width) for ``affmae.bench.attention``; a given ``grp`` must match ``group``.
    """
    m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M = nbr.shape[1]
    G, grp, _ = _structures(nbr, m, group, grp, None, need_t=False)
    nG = num_groups(M, G)
    pos = _ensure(pos, torch.float32)  # (B, N, 2)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _fwd_kernel[(nG, B * H)](
        q, k, v, pos, grp, w, wb, bk, bv, out, lse,
        q.stride(0), q.stride(1), q.stride(2), N * H * D, H * D, D, N * 2, 2, grp.shape[1], H * N, N,
        H, M, n_valid, nG, (grp.shape[1] - 2 * nG) // 2, float(scale),
        **_tiles(m, D, q.dtype, G, block_k, num_warps),
    )
    return out, lse


def attention_backward(
    do, q, k, v, o, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    grp: torch.Tensor | None = None, grp_t: torch.Tensor | None = None, group: int | None = None,
    block_k: int = BLOCK_K, num_warps: int | None = None, dqkv: torch.Tensor | None = None,
    passes: str = "qkv", validate: bool = True,
):
    """Backward kernels. Returns dq, dk, dv (input dtype) and g (6 H + 2 H D,) float32, the
    packed small gradients, parameter after parameter: d bias_weight (H, 5), d bias_bias (H,),
    d blank_k (H, D), d blank_v (H, D) (``unpack_param_grads``).

    ``o`` and ``lse``: the forward's output and log-sum-exp (``attention_forward``). ``o`` gives
    each row's dO . O, which pass 1 subtracts from dP before its products (module docstring).

    ``grp`` / ``grp_t``: ``attention_groups(nbr, m)`` and ``attention_groups(nbr, m,
    transpose=True)`` if the caller has them (the blocks of a stage share one neighbourhood,
    so the model builds them once per stage); built here otherwise.
    ``dqkv``: a (B, N, 3, H, D) tensor in q's dtype, unit stride on the head dim, that the kernels
    write dq, dk, dv into (returned as its three slices) instead of three new tensors; see
    ``attention_backward_packed``.
    ``group``, ``block_k``, ``num_warps``: tiling overrides (``attention_forward``).
    ``passes``: "q" runs the query-major pass alone (dq and the gradients of the bias bias and
    the blank key / value; dk and dv are returned unwritten and the bias weights' gradient,
    which pass 2 computes, as NaN), to time each pass.
    ``validate=False`` skips the checks of q, k, v, positions, neighbourhoods and parameters
    (not those of the group structures and ``dqkv``): for the autograd Function, whose forward
    checked the same tensors (host time per eager backward).
    """
    if passes not in ("qkv", "q"):
        raise ValueError(f"passes must be 'qkv' or 'q', got {passes!r}")
    if validate:
        m = check_inputs(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v)
    else:
        m = q.shape[1] // nbr.shape[1]
    q, k, v = _token_views(q, k, v)
    B, N, H, D = q.shape
    M = nbr.shape[1]
    G, grp, grp_t = _structures(nbr, m, group, grp, grp_t, need_t=passes == "qkv")
    nG = num_groups(M, G)
    do = _ensure(do, q.dtype)  # (B, N, H, D), the layout of out
    o = _ensure(o, q.dtype)
    if o.shape != do.shape:
        raise ValueError(f"o (the forward's output) must be {tuple(do.shape)}, got {tuple(o.shape)}")
    pos = _ensure(pos, torch.float32)  # (B, N, 2)
    w, wb, bk, bv = (_ensure(t) for t in (bias_weight, bias_bias, blank_k, blank_v))
    dev = q.device
    tiles = _tiles(m, D, q.dtype, G, block_k, num_warps, kernel="q")
    if dqkv is None:
        dq, dk, dv = (torch.empty(B, N, H, D, device=dev, dtype=q.dtype) for _ in range(3))
    else:
        if tuple(dqkv.shape) != (B, N, 3, H, D) or dqkv.dtype != q.dtype or dqkv.stride(-1) != 1:
            raise ValueError(f"dqkv must be ({B}, {N}, 3, {H}, {D}) {q.dtype} with a unit stride on "
                             f"the head dim, got {tuple(dqkv.shape)} {dqkv.dtype} strides {dqkv.stride()}")
        dq, dk, dv = dqkv.unbind(2)
    # dq, dk, dv share strides: all contiguous (B, N, H, D), or all slices of dqkv.
    strides = (*q.stride()[:3], N * H * D, H * D, D, *dq.stride()[:3], N * 2, 2)
    rows = torch.empty(2, B, H, N, device=dev, dtype=torch.float32)  # corrected lse, delta
    g = torch.empty(6 * H + 2 * H * D, device=dev, dtype=torch.float32)  # the packed gradients
    # Per-program partial gradients, parameter-major: pass 1's of the bias bias and the blank
    # key / value (H + 2 H D rows), pass 2's of the bias weights (5 H rows).
    parts = torch.empty(H + 2 * H * D, B * nG, device=dev, dtype=torch.float32)
    _bwd_q_kernel[(nG, B * H)](
        q, k, v, do, o, pos, grp, w, wb, bk, bv, lse, rows, dq, parts,
        *strides, grp.shape[1], H * N, N, B * H * N,
        H, M, n_valid, nG, (grp.shape[1] - 2 * nG) // 2, float(scale), **tiles,
    )
    if passes == "q":  # pass 2 (which sums pass 1's partials and computes the weights') skipped
        g[:5 * H] = float("nan")
        torch.sum(parts, -1, out=g[5 * H:])
        return dq, dk, dv, g
    tiles = _tiles(m, D, q.dtype, G, block_k, num_warps, kernel="kv")
    parts_w = torch.empty(5 * H, B * nG, device=dev, dtype=torch.float32)
    _bwd_kv_kernel[(nG, B * H)](
        q, k, v, do, pos, grp_t, w, wb, rows, dk, dv, parts, g[5 * H:], parts_w,
        *strides, grp_t.shape[1], H * N, N, B * H * N,
        H, M, n_valid, nG, (grp_t.shape[1] - 2 * nG) // 2, float(scale), parts.shape[0], parts.shape[1],
        **tiles,
    )
    torch.sum(parts_w, -1, out=g[:5 * H])  # pass 2's partials: one more (small) launch
    return dq, dk, dv, g


def check_packed(qkv: torch.Tensor) -> None:
    """Raise unless ``qkv`` is a packed (B, N, 3, H, D) tensor."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D), got shape {tuple(qkv.shape)}")


def attention_backward_packed(
    do, qkv, o, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
    grp: torch.Tensor | None = None, grp_t: torch.Tensor | None = None, **options,
):
    """``attention_backward`` for q, k, v = ``qkv.unbind(2)`` of a packed (B, N, 3, H, D) ``qkv``
    (a fused projection's output). Returns dqkv (B, N, 3, H, D), contiguous, in qkv's dtype, and g.

    The kernels write dq, dk, dv straight into dqkv's slices, so dqkv is the gradient of the
    packed tensor as it is; three separate gradients would need autograd's ``UnbindBackward``
    to stack them (one copy kernel per attention layer). Same kernels, same values.
    ``options``: ``attention_backward``'s keyword options (tiling, ``validate``).
    """
    check_packed(qkv)
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    *_, g = attention_backward(
        do, *qkv.unbind(2), o, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
        grp=grp, grp_t=grp_t, dqkv=dqkv, **options,
    )
    return dqkv, g


def unpack_param_grads(g: torch.Tensor, bias_weight, bias_bias, blank_k, blank_v):
    """Split the packed (6 H + 2 H D,) float32 gradient of ``attention_backward`` into the four
    parameter gradients, in the parameters' dtypes: contiguous views for float32 parameters
    (autograd then keeps them as the ``.grad``s without a copy)."""
    H, D = blank_k.shape
    w, wb, bk, bv = g.split([5 * H, H, H * D, H * D])
    grads = (w.view(H, 5), wb, bk.view(H, D), bv.view(H, D))
    params = (bias_weight, bias_bias, blank_k, blank_v)
    return tuple(d if p.dtype == d.dtype else d.to(p.dtype) for d, p in zip(grads, params))
