"""Triton helpers for a reduction's last step inside the kernel: "the last program reduces".

A kernel whose programs each produce a float32 partial row used to write the (programs, R)
partials and leave their sum to a second launch (a PyTorch ``sum``). Here every program stores
its row, takes a ticket from its group's int32 counter (``affmae.ops._tickets``), and the program
that draws the group's last ticket sums the group's rows and resets the counter to 0. One launch,
no float atomics: the result is bitwise repeatable.

Fixed order: the rows are summed by ``sum_rows``, BLOCK_R rows at a time in increasing row order,
each block by ``tl.sum`` (a fixed tree for the compiled kernel). Whichever program draws the
last ticket runs that same code on the same rows, so the result does not depend on which one it
is or on the order the programs finished in.

Memory ordering (why the last program sees every partial):
1. Each program stores its partial row (every thread its part), then ``tl.debug_barrier()``
   (``bar.sync``): all of the program's stores come before its ticket.
2. The ticket: ``tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")``. Release: this
   program's stores (ordered before it by the barrier) are visible at gpu scope to whoever
   acquires a later value of the counter; acquire: the program with the last ticket sees the
   stores of every program that took an earlier one (the counter's atomic adds form one release
   sequence).
3. The last program loads the partials with ``cache_modifier=".cg"`` (L2, not the SM's L1,
   which is not coherent with other SMs' stores).
4. It resets the counter with ``tl.atomic_xchg(count, 0)``; the next kernel on the stream starts
   after this one ends, so it finds zeros.
Triton's interpreter runs programs one after another and cannot test any of this; only a GPU
run can.

``last_program_reduces``: two levels for kernels with many programs (a layer-norm backward's
1024, a merge's thousands), so that no single program reads all the partials: groups of
``group`` programs (``plan``: at least 32 programs each, at most 32 groups); the last of each
group sums its group's rows into a row of MID; the last of those group sums adds the MID rows
into OUT. With one group the first level writes OUT directly. Slots used: groups, plus one
when there are two levels.
"""

from __future__ import annotations

import triton
import triton.language as tl


def plan(progs: int, most: int = 32) -> tuple[int, int, int]:
    """-> (programs per group, groups, counter slots) for ``progs`` programs: groups of at least
    ``most`` programs and at most ``most`` groups (so at most ``most`` + 1 slots)."""
    group = max(most, -(-progs // most))
    groups = -(-progs // group)
    return group, groups, groups + (groups > 1)


@triton.jit
def sum_rows(SRC, row_stride, lo, hi, cols, c_ok, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """(BLOCK_C,) float32: rows lo..hi-1 of SRC[row * row_stride + cols] summed in a fixed order
    (BLOCK_R rows at a time, in increasing order); L2 loads (module docstring, step 3)."""
    total = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        p = tl.load(SRC + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                    mask=(rows < hi)[:, None] & c_ok[None, :], other=0.0, cache_modifier=".cg")
        total += tl.sum(p, 0)
    return total


@triton.jit
def take_ticket(COUNT):
    """This program's ticket (0, 1, ...) from the counter at COUNT, after all of its threads'
    stores (module docstring, steps 1-2)."""
    tl.debug_barrier()
    return tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _sum_store(SRC, lo, hi, DST, R, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # DST[:R] = rows lo..hi-1 of the (rows, R) SRC, summed; BLOCK_C columns at a time
    for c0 in range(0, R, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols < R
        tl.store(DST + cols, sum_rows(SRC, R, lo, hi, cols, c_ok, BLOCK_R, BLOCK_C), mask=c_ok)


@triton.jit
def last_program_reduces(PART, MID, OUT, COUNT, pid, progs, group, R,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Call after program ``pid`` of ``progs`` stored its row of the (progs, R) float32 PART:
    the last program writes OUT[:R] = PART.sum(0) (module docstring). MID: (groups, R) float32
    scratch (unused with one group); COUNT: ``plan``'s slots, zero, left zero."""
    g = pid // group
    lo = g * group
    hi = tl.minimum(lo + group, progs)
    groups = tl.cdiv(progs, group)
    if take_ticket(COUNT + g) == hi - lo - 1:  # the last program of group g
        if groups == 1:
            _sum_store(PART, lo, hi, OUT, R, BLOCK_R, BLOCK_C)
        else:
            _sum_store(PART, lo, hi, MID + g.to(tl.int64) * R, R, BLOCK_R, BLOCK_C)
            if take_ticket(COUNT + groups) == groups - 1:  # the last group to finish
                _sum_store(MID, 0, groups, OUT, R, BLOCK_R, BLOCK_C)
                tl.atomic_xchg(COUNT + groups, 0)
        tl.atomic_xchg(COUNT + g, 0)
