"""Weighted point gather, Triton kernels: forward and backward (AFFMAE sec. 3.2; DESIGN 2.5).

Computes the function of ``reference.py``: for every sampling-point row r = (b, q, h, p),

    out[r, :] = sum_k w[r, k] * table[b, sel[r, k], h, :]

How it is computed (rows r are the flattened (B, Nq, H, Pt) index, row-major):
1. Forward, one program per BLOCK_R rows: for each of the K slots (unrolled), load the slot
   indices and weights of the rows, gather the (BLOCK_R, F) table rows (one contiguous F-vector
   each), accumulate w * row in float32 registers; store once in the table's dtype. Nothing of
   size (rows, K, F) is ever written.
2. Backward, same tiling: load dO rows once (float32); per slot, gather the table rows again for
   d_w[r, k] = dot(dO[r], table[b, sel[r, k], h]) (float32, written directly).
3. d_table, two ways (``dtable`` argument; docs/BENCHMARKS.md has the measurement):
   "atomic" (default; 2.2x faster than "sorted" on an H100 at the decoder's sizes, also with
   spatially local slots): step 2's kernel also scatters w[r, k] * dO[r] into a float32
   (B, Nk, H, F) buffer with relaxed float32 atomics, cast to the table's dtype at the end.
   Equal slots of one row add once, with their weights summed first (the decoder's points of
   a head share most of their neighbours).
   "sorted": the flat table row of every (row, slot) entry, a stable ``torch.sort`` and
   a ``bincount`` give each table row its incoming entries (CSR); one program per table row sums
   w * dO over them in float32 and writes the row once. Deterministic (fixed summation order);
   the sort, bincount and cumsum launches cost more than the atomics save.
   Duplicate slots (in a row or across rows) add up in both, as in the reference.
4. Shared slots (token merging: ``sel`` with Pt = 1, ``weights`` with Pt = J > 1, every weight
   set of a row over the same K slots): ``_fwd_shared_kernel`` gathers each table row once for
   the J outputs, and ``_bwd_shared_kernel`` sums the J contributions before its one atomic add
   per (row, slot, feature): J times fewer gathers and atomics than J separate rows. "sorted"
   d_table expands ``sel`` to the J points and runs step 3.

Supported: table float32, bfloat16 or float16 (output and d_table in that dtype), weights any
float dtype (read as float32; d_weights returned in the weights' dtype), sel int64 or int32,
feature dim F in 16..128 (any, masked to a power of two), K <= 64. B, Nq, Nk, H, Pt are runtime
arguments that are never specialised (``do_not_specialize``), so a new batch size or resolution
does not recompile; F, K and the dtypes are compile-time. With TRITON_INTERPRET=1 the same kernels
run on CPU tensors through Triton's interpreter (tests).

Differences from the reference: the forward accumulates in float32 in the order k = 0..K-1, as
``embedding_bag`` does (within rounding); "atomic" d_table's sum order depends on scheduling, so
it is not bitwise repeatable ("sorted" is). Slots are not range-checked (the reference's
CUDA path asserts); callers pass slots from the decoder's neighbour tables, in range by construction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from affmae.ops.dispatch import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_FEAT, MAX_FEAT = 16, 128
MAX_K = 64  # slots per row: the decoder uses Pt * K = 16, token merging Kc * m = 64
_SIZES = ["R", "HP", "QHP", "Pt"]  # never specialised (see the module docstring)


def why_not(table: torch.Tensor, sel: torch.Tensor) -> str | None:
    """Reason the kernels cannot run on these inputs, or None when they can."""
    if table.dtype not in SUPPORTED_DTYPES:
        return f"table dtype {table.dtype} is not supported (use one of {SUPPORTED_DTYPES})"
    if table.dim() != 4:
        return f"table must be (B, Nk, H, F), got shape {tuple(table.shape)}"
    if not MIN_FEAT <= table.shape[-1] <= MAX_FEAT:
        return f"feature dim F={table.shape[-1]} is outside [{MIN_FEAT}, {MAX_FEAT}]"
    if sel.dim() != 5 or not 1 <= sel.shape[-1] <= MAX_K:
        return f"sel must be (B, Nq, H, Pt, K) with 1 <= K <= {MAX_K}, got shape {tuple(sel.shape)}"
    if table.device.type == "cpu" and not interpreting():
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)"
    if table.device.type not in ("cuda", "cpu"):
        return f"device {table.device} is not supported"
    return None


# ----------------------------------------------------------------------------------------------
# Kernels. Row r -> b = r // (Nq*H*Pt), h = (r // Pt) % H. Row indices are int32 (the launcher
# checks R < 2^31); memory offsets are int64. The table has strides (stb, stn, sth, 1); sel,
# weights, out, dO, d_weights are contiguous; the float32 d_table buffer is contiguous (B, Nk, H, F).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows(pid, R, HP, QHP, Pt, stb, sth, BLOCK_R: tl.constexpr):
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) int32
    r_ok = r < R
    b = r // QHP
    h = (r % HP) // Pt
    base = b.to(tl.int64) * stb + h.to(tl.int64) * sth  # table offset of (b, 0, h, 0)
    return r, r_ok, b, h, base


@triton.jit(do_not_specialize=_SIZES)
def _fwd_kernel(
    T, SEL, W, O, R, HP, QHP, Pt, stb, stn, sth,
    F: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # 1. This program's rows and their table base offsets.
    r, r_ok, b, h, base = _rows(tl.program_id(0), R, HP, QHP, Pt, stb, sth, BLOCK_R)
    rf = tl.arange(0, BLOCK_F)
    rf_ok = rf < F
    m2 = r_ok[:, None] & rf_ok[None, :]
    r64 = r.to(tl.int64)
    # 2. Slot by slot: gather one table row per sampling point, accumulate in float32.
    acc = tl.zeros([BLOCK_R, BLOCK_F], tl.float32)
    for k in tl.static_range(K):
        s = tl.load(SEL + r64 * K + k, mask=r_ok, other=0).to(tl.int64)
        w = tl.load(W + r64 * K + k, mask=r_ok, other=0.0).to(tl.float32)
        t = tl.load(T + (base + s * stn)[:, None] + rf[None, :], mask=m2, other=0.0)
        acc += w[:, None] * t.to(tl.float32)
    # 3. One store in the table's dtype.
    tl.store(O + r64[:, None] * F + rf[None, :], acc.to(O.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=_SIZES)
def _bwd_kernel(
    T, SEL, W, DO, DT32, DW, R, HP, QHP, Pt, stb, stn, sth, sdb, sdn, sdh,
    F: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr, NEED_DT: tl.constexpr, NEED_DW: tl.constexpr,
):
    # 1. Rows, their upstream gradient (float32, loaded once) and d_table base offsets.
    r, r_ok, b, h, base = _rows(tl.program_id(0), R, HP, QHP, Pt, stb, sth, BLOCK_R)
    rf = tl.arange(0, BLOCK_F)
    rf_ok = rf < F
    m2 = r_ok[:, None] & rf_ok[None, :]
    r64 = r.to(tl.int64)
    do = tl.load(DO + r64[:, None] * F + rf[None, :], mask=m2, other=0.0).to(tl.float32)
    dbase = b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    if NEED_DT:
        # A row's slots repeat where its points share neighbours (the decoder's Pt points of a
        # head lie within a token spacing): the weights of equal slots are summed first and
        # only the first occurrence adds, so each distinct (row, slot) costs one atomic add.
        kk = tl.arange(0, BLOCK_K)
        mk = r_ok[:, None] & (kk < K)[None, :]
        s_all = tl.load(SEL + r64[:, None] * K + kk[None, :], mask=mk, other=-1)
        w_all = tl.load(W + r64[:, None] * K + kk[None, :], mask=mk, other=0.0).to(tl.float32)
    # 2. Per slot: d_w = dO . gathered row; d_table[b, s, h] += w * dO (float32 atomics).
    for k in tl.static_range(K):
        s = tl.load(SEL + r64 * K + k, mask=r_ok, other=0).to(tl.int64)
        if NEED_DW:
            t = tl.load(T + (base + s * stn)[:, None] + rf[None, :], mask=m2, other=0.0)
            tl.store(DW + r64 * K + k, tl.sum(do * t.to(tl.float32), 1), mask=r_ok)
        if NEED_DT:
            same = s_all == s.to(s_all.dtype)[:, None]  # (BLOCK_R, BLOCK_K)
            first = tl.sum((same & (kk < k)[None, :]).to(tl.int32), 1) == 0
            w = tl.sum(tl.where(same, w_all, 0.0), 1)
            tl.atomic_add(DT32 + (dbase + s * sdn)[:, None] + rf[None, :], w[:, None] * do,
                          mask=m2 & first[:, None], sem="relaxed")


@triton.jit(do_not_specialize=_SIZES)
def _fwd_shared_kernel(
    T, SEL, W, O, R, HP, QHP, Pt, stb, stn, sth,
    F: tl.constexpr, K: tl.constexpr, J: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # Rows r = (b, q, h) whose J weight sets share one list of K slots (token merging): each
    # gathered table row serves all J outputs of its row.
    r, r_ok, b, h, base = _rows(tl.program_id(0), R, HP, QHP, Pt, stb, sth, BLOCK_R)
    rj = tl.arange(0, BLOCK_J)
    rf = tl.arange(0, BLOCK_F)
    rf_ok = rf < F
    r64 = r.to(tl.int64)
    rowj = r64[:, None] * J + rj[None, :]  # (BLOCK_R, BLOCK_J) output row of weight set j
    mrj = r_ok[:, None] & (rj < J)[None, :]
    m2 = r_ok[:, None] & rf_ok[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_J, BLOCK_F], tl.float32)
    for k in tl.static_range(K):
        s = tl.load(SEL + r64 * K + k, mask=r_ok, other=0).to(tl.int64)
        w = tl.load(W + rowj * K + k, mask=mrj, other=0.0).to(tl.float32)
        t = tl.load(T + (base + s * stn)[:, None] + rf[None, :], mask=m2, other=0.0)
        acc += w[:, :, None] * t.to(tl.float32)[:, None, :]
    tl.store(O + (rowj * F)[:, :, None] + rf[None, None, :], acc.to(O.dtype.element_ty),
             mask=mrj[:, :, None] & rf_ok[None, None, :])


@triton.jit(do_not_specialize=_SIZES)
def _bwd_shared_kernel(
    T, SEL, W, DO, DT32, DW, R, HP, QHP, Pt, stb, stn, sth, sdb, sdn, sdh,
    F: tl.constexpr, K: tl.constexpr, J: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr, NEED_DT: tl.constexpr, NEED_DW: tl.constexpr,
):
    # As _bwd_kernel, with the J weight sets of a row summed before the atomic add: one float32
    # atomic per (row, slot, feature) instead of J.
    r, r_ok, b, h, base = _rows(tl.program_id(0), R, HP, QHP, Pt, stb, sth, BLOCK_R)
    rj = tl.arange(0, BLOCK_J)
    rf = tl.arange(0, BLOCK_F)
    rf_ok = rf < F
    r64 = r.to(tl.int64)
    rowj = r64[:, None] * J + rj[None, :]
    mrj = r_ok[:, None] & (rj < J)[None, :]
    m2 = r_ok[:, None] & rf_ok[None, :]
    do = tl.load(DO + (rowj * F)[:, :, None] + rf[None, None, :],
                 mask=mrj[:, :, None] & rf_ok[None, None, :], other=0.0).to(tl.float32)
    dbase = b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    for k in tl.static_range(K):
        s = tl.load(SEL + r64 * K + k, mask=r_ok, other=0).to(tl.int64)
        if NEED_DW:
            t = tl.load(T + (base + s * stn)[:, None] + rf[None, :], mask=m2, other=0.0)
            tl.store(DW + rowj * K + k, tl.sum(do * t.to(tl.float32)[:, None, :], 2), mask=mrj)
        if NEED_DT:
            w = tl.load(W + rowj * K + k, mask=mrj, other=0.0).to(tl.float32)
            tl.atomic_add(DT32 + (dbase + s * sdn)[:, None] + rf[None, :],
                          tl.sum(w[:, :, None] * do, 1), mask=m2, sem="relaxed")


@triton.jit(do_not_specialize=["Nq", "Nk", "H", "Pt"])
def _bwd_window_kernel(
    T, SEL, W, DO, DT32, DW, Nq, Nk, H, Pt, stb, stn, sth, sdb, sdn, sdh,
    F: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
    WIN: tl.constexpr, NEED_DW: tl.constexpr,
):
    # "window" d_table: one program per BLOCK_R consecutive (query, point) rows of one (b, h).
    # Their entries mostly land in a few nearby table rows (queries in curve order, sampling
    # points near the query), so the contributions to the WIN table rows from the smallest slot
    # on are summed first, A (WIN, BLOCK_R) @ dO (BLOCK_R, F) with A[i, j] = sum of row j's
    # weights on slot lo + i (float32 products and sums, no TF32), and each of those table rows
    # gets one float32 atomic add per feature; entries past the window add directly. d_weights
    # as in _bwd_kernel.
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    j = pid_q * BLOCK_R + tl.arange(0, BLOCK_R)  # (query, point) index within (b, h)
    j_ok = j < Nq * Pt
    q = j // Pt
    r64 = (((b * Nq + q) * H + h) * Pt + j % Pt).to(tl.int64)  # flat row (b, q, h, p)
    rf = tl.arange(0, BLOCK_F)
    rf_ok = rf < F
    m2 = j_ok[:, None] & rf_ok[None, :]
    do = tl.load(DO + r64[:, None] * F + rf[None, :], mask=m2, other=0.0).to(tl.float32)
    base = b.to(tl.int64) * stb + h.to(tl.int64) * sth
    dbase = b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    big = 2**62
    s = tl.load(SEL + r64 * K, mask=j_ok, other=0).to(tl.int64)
    lo = tl.min(tl.where(j_ok, s, big), 0)  # smallest slot of the program's entries
    for k in tl.static_range(1, K):
        s = tl.load(SEL + r64 * K + k, mask=j_ok, other=0).to(tl.int64)
        lo = tl.minimum(lo, tl.min(tl.where(j_ok, s, big), 0))
    win = lo + tl.arange(0, WIN).to(tl.int64)  # (WIN,) table rows of the window
    a = tl.zeros([WIN, BLOCK_R], tl.float32)
    hit = tl.zeros([WIN], tl.int32)
    for k in tl.static_range(K):
        s = tl.load(SEL + r64 * K + k, mask=j_ok, other=0).to(tl.int64)
        w = tl.load(W + r64 * K + k, mask=j_ok, other=0.0).to(tl.float32)
        if NEED_DW:
            t = tl.load(T + (base + s * stn)[:, None] + rf[None, :], mask=m2, other=0.0)
            tl.store(DW + r64 * K + k, tl.sum(do * t.to(tl.float32), 1), mask=j_ok)
        on = (s[None, :] == win[:, None]) & j_ok[None, :]  # (WIN, BLOCK_R)
        a += tl.where(on, w[None, :], 0.0)
        hit += tl.sum(on.to(tl.int32), 1)
        out = j_ok & (s - lo >= WIN)  # entries past the window: direct atomics
        tl.atomic_add(DT32 + (dbase + s * sdn)[:, None] + rf[None, :], w[:, None] * do,
                      mask=out[:, None] & rf_ok[None, :], sem="relaxed")
    d = tl.dot(a, do, input_precision="ieee")  # (WIN, BLOCK_F) float32
    tl.atomic_add(DT32 + (dbase + win * sdn)[:, None] + rf[None, :], d,
                  mask=(hit > 0)[:, None] & rf_ok[None, :], sem="relaxed")


@triton.jit
def _dtable_sorted_kernel(
    PERM, OFF, W, DO, DT, K,
    F: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # Program t = flat table row (b, n, h): its incoming entries are PERM[OFF[t] : OFF[t + 1]]
    # (entry e = r * K + k, grouped by table row, in entry order); sum w[e] * dO[e // K] in
    # float32 registers and write the row once, in the table's dtype. No atomics: deterministic.
    t = tl.program_id(0).to(tl.int64)
    start = tl.load(OFF + t)
    end = tl.load(OFF + t + 1)
    rf = tl.arange(0, BLOCK_F)
    rf_ok = rf < F
    acc = tl.zeros([BLOCK_F], tl.float32)
    for e0 in range(start, end, BLOCK_E):
        i = e0 + tl.arange(0, BLOCK_E)
        i_ok = i < end
        e = tl.load(PERM + i, mask=i_ok, other=0)
        w = tl.load(W + e, mask=i_ok, other=0.0).to(tl.float32)
        do = tl.load(DO + (e // K)[:, None] * F + rf[None, :], mask=i_ok[:, None] & rf_ok[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * do, 0)
    tl.store(DT + t * F + rf, acc.to(DT.dtype.element_ty), mask=rf_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def check_inputs(table: torch.Tensor, sel: torch.Tensor, weights: torch.Tensor) -> None:
    """Validate shapes and dtypes (errors name the bad value)."""
    reason = why_not(table, sel)
    if reason:
        raise ValueError(reason)
    B, Nk, H, _ = table.shape
    if sel.shape[0] != B or sel.shape[2] != H:
        raise ValueError(f"sel must be (B={B}, Nq, H={H}, Pt, K), got {tuple(sel.shape)}")
    if sel.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"sel must be int64 or int32, got {sel.dtype}")
    if weights.dim() != 5 or (weights.shape[:3] != sel.shape[:3] or weights.shape[4] != sel.shape[4]
                              or sel.shape[3] not in (1, weights.shape[3])):
        raise ValueError(f"weights shape {tuple(weights.shape)} does not match sel shape "
                         f"{tuple(sel.shape)} (equal, or sel's Pt = 1 shared by every point)")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    if sel[..., 0].numel() >= 2**31:
        raise ValueError(f"{sel[..., 0].numel()} sampling-point rows exceed the int32 row index")


def _launch_params(F: int, K: int, block_rows: int | None, num_warps: int | None) -> dict:
    """Compile-time tile parameters: F and K come from the model, never from batch or resolution."""
    block_f = max(16, triton.next_power_of_2(F))
    # ~2048 gathered elements per slot and program (32 rows at F = 64): the fastest of the row
    # tiles 32 / 64 / 128 x 2 / 4 / 8 warps measured on an H100 (docs/BENCHMARKS.md).
    block_r = block_rows or max(16, min(128, 2048 // block_f))
    return dict(F=F, K=K, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=num_warps or 4)


def _shared(sel: torch.Tensor, weights: torch.Tensor) -> int:
    """J weight sets per slot list when sel's Pt is 1 and the weights' is J > 1, else 0."""
    return weights.shape[3] if sel.shape[3] == 1 and weights.shape[3] > 1 else 0


def _shared_params(F: int, K: int, J: int, block_rows: int | None, num_warps: int | None) -> dict:
    """Tile of the shared-slot kernels: about 4096 float32 accumulators (8 rows x 4 sets x 128)."""
    block_f = max(16, triton.next_power_of_2(F))
    block_j = triton.next_power_of_2(J)
    block_r = block_rows or max(4, min(64, 4096 // (block_f * block_j)))
    return dict(F=F, K=K, J=J, BLOCK_R=block_r, BLOCK_J=block_j, BLOCK_F=block_f,
                num_warps=num_warps or 4)


def _table_view(table: torch.Tensor) -> torch.Tensor:
    # Any strides with a unit feature stride (e.g. a view of a fused projection); copy otherwise.
    return table if table.stride(-1) == 1 else table.contiguous()


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def gather_forward(table: torch.Tensor, sel: torch.Tensor, weights: torch.Tensor,
                   block_rows: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Forward kernel: (B, Nq, H, Pt, F) in table's dtype. ``block_rows`` and ``num_warps``
    override the launch tile (for ``affmae.bench.point_gather``)."""
    check_inputs(table, sel, weights)
    table, sel, weights = _table_view(table), _contig(sel), _contig(weights)
    B, Nk, H, F = table.shape
    Nq, Pt, K = sel.shape[1], sel.shape[3], sel.shape[4]
    R = B * Nq * H * Pt
    J = _shared(sel, weights)
    out = torch.empty(B, Nq, H, max(Pt, J), F, device=table.device, dtype=table.dtype)
    if R == 0:
        return out
    if J:
        p = _shared_params(F, K, J, block_rows, num_warps)
        _fwd_shared_kernel[(triton.cdiv(R, p["BLOCK_R"]),)](
            table, sel, weights, out, R, H, Nq * H, 1,
            table.stride(0), table.stride(1), table.stride(2), **p,
        )
        return out
    p = _launch_params(F, K, block_rows, num_warps)
    _fwd_kernel[(triton.cdiv(R, p["BLOCK_R"]),)](
        table, sel, weights, out, R, H * Pt, Nq * H * Pt, Pt,
        table.stride(0), table.stride(1), table.stride(2), **p,
    )
    return out


DTABLE_MODES = ("atomic", "sorted", "window")
_WINDOW = dict(BLOCK_R=32, WIN=64)  # "window" d_table: rows per program, table rows per window


def gather_backward(do: torch.Tensor, table: torch.Tensor, sel: torch.Tensor, weights: torch.Tensor,
                    need_table: bool = True, need_weights: bool = True, dtable: str = "atomic",
                    block_rows: int | None = None,
                    num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward kernels: d_table (B, Nk, H, F) in table's dtype and d_weights (B, Nq, H, Pt, K)
    in weights' dtype. A gradient not needed comes back as an empty tensor of its dtype.

    ``dtable``: "atomic" (float32 atomics from the row-major kernel, default), "sorted"
    (entries grouped by table row with a stable sort, one segment sum per row: deterministic)
    or "window" (each program sums its rows' contributions to a window of table rows with one
    matmul before the atomics; shared slot lists take "atomic"'s shared kernel).
    """
    if dtable not in DTABLE_MODES:
        raise ValueError(f"dtable must be one of {DTABLE_MODES}, got {dtable!r}")
    check_inputs(table, sel, weights)
    table, sel, weights = _table_view(table), _contig(sel), _contig(weights)
    B, Nk, H, F = table.shape
    Nq, Pt, K = sel.shape[1], sel.shape[3], sel.shape[4]
    J = _shared(sel, weights)
    if tuple(do.shape) != (B, Nq, H, max(Pt, J), F):
        raise ValueError(f"d_out must be {(B, Nq, H, max(Pt, J), F)}, got {tuple(do.shape)}")
    do = _contig(do)
    R = B * Nq * H * Pt
    dev = table.device
    atomic = need_table and dtable in ("atomic", "window")  # both add into a float32 buffer
    dt32 = torch.zeros(B, Nk, H, F, device=dev, dtype=torch.float32) if atomic else None
    dw = torch.empty(weights.shape, device=dev, dtype=torch.float32) if need_weights else None
    if J:
        p = _shared_params(F, K, J, block_rows, num_warps)
        if R > 0 and (atomic or need_weights):
            placeholder = do
            _bwd_shared_kernel[(triton.cdiv(R, p["BLOCK_R"]),)](
                table, sel, weights, do, placeholder if dt32 is None else dt32,
                placeholder if dw is None else dw, R, H, Nq * H, 1,
                table.stride(0), table.stride(1), table.stride(2), Nk * H * F, H * F, F,
                NEED_DT=atomic, NEED_DW=need_weights, **p,
            )
        sel_full = sel.expand(weights.shape).contiguous() if need_table and not atomic else sel
        return _finish(do, table, sel_full, weights, dt32, dw, need_table, need_weights, atomic,
                       B, Nk, H, F, p["BLOCK_F"])
    p = _launch_params(F, K, block_rows, num_warps)
    if R > 0 and atomic and dtable == "window":
        placeholder = do
        w_p = dict(_WINDOW, BLOCK_R=block_rows or _WINDOW["BLOCK_R"])
        _bwd_window_kernel[(triton.cdiv(Nq * Pt, w_p["BLOCK_R"]), B * H)](
            table, sel, weights, do, dt32, placeholder if dw is None else dw, Nq, Nk, H, Pt,
            table.stride(0), table.stride(1), table.stride(2), Nk * H * F, H * F, F,
            F=F, K=K, BLOCK_F=p["BLOCK_F"], NEED_DW=need_weights, num_warps=num_warps or 4,
            **w_p,
        )
    elif R > 0 and (atomic or need_weights):
        placeholder = do  # pointer argument for a disabled output (never written)
        _bwd_kernel[(triton.cdiv(R, p["BLOCK_R"]),)](
            table, sel, weights, do, placeholder if dt32 is None else dt32,
            placeholder if dw is None else dw, R, H * Pt, Nq * H * Pt, Pt,
            table.stride(0), table.stride(1), table.stride(2), Nk * H * F, H * F, F,
            BLOCK_K=triton.next_power_of_2(K), NEED_DT=atomic, NEED_DW=need_weights, **p,
        )
    return _finish(do, table, sel, weights, dt32, dw, need_table, need_weights, atomic,
                   B, Nk, H, F, p["BLOCK_F"])


def _finish(do, table, sel, weights, dt32, dw, need_table, need_weights, atomic, B, Nk, H, F,
            block_f):
    """d_table (cast from the atomics' float32 buffer, or by the sorted segment sums; ``sel``
    as many points as ``weights`` there) and d_weights in the weights' dtype."""
    if not need_table:
        d_table = table.new_empty(0)
    elif atomic:
        d_table = dt32.to(table.dtype)
    else:
        d_table = _dtable_sorted(do, sel, weights, B, Nk, H, F, table.dtype, block_f)
    d_weights = dw.to(weights.dtype) if need_weights else weights.new_empty(0)
    return d_table, d_weights


def _dtable_sorted(do, sel, weights, B, Nk, H, F, dtype, block_f):
    """d_table without atomics: flat table row of every (row, slot) entry, stable sort, CSR."""
    Nq, Pt, K = sel.shape[1], sel.shape[3], sel.shape[4]
    dev = sel.device
    T = B * Nk * H
    b = torch.arange(B, device=dev).view(B, 1, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, 1, H, 1, 1)
    key = ((b * Nk + sel) * H + h).view(-1)  # (R * K,) flat table row of each entry
    key = key.to(torch.int32) if T < 2**31 else key
    perm = torch.sort(key, stable=True).indices  # entries grouped by table row, entry order kept
    off = torch.zeros(T + 1, device=dev, dtype=torch.int64)
    torch.cumsum(torch.bincount(key, minlength=T), 0, out=off[1:])  # (T + 1,) CSR offsets
    d_table = torch.empty(B, Nk, H, F, device=dev, dtype=dtype)
    if T > 0:
        _dtable_sorted_kernel[(T,)](perm, off, weights, do, d_table, K,
                                    F=F, BLOCK_E=16, BLOCK_F=block_f, num_warps=2)
    return d_table
