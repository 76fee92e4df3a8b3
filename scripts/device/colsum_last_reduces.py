"""Prototype for the next step towards 2x at 512 px: column sums in ONE launch.

``affmae.ops.linear.kernel.colsum`` is two launches: the Triton kernel writes (SPLIT, N) float32
partials, then ``partials.sum(0)`` (a PyTorch reduce kernel) adds them. Together with the
layer-norm backward's ``part.sum(-1)`` that second stage is most of the 203 ``reduce_kernel``
launches (1.11 ms) of a replayed aff_small step at 512 px (session 9's timeline).

Here the last program of each column block adds the partials: every program stores its partial
row, all its threads meet at a barrier, and it takes a ticket from an int32 counter per column
block (``atomic_add``, acq_rel, gpu scope). The program with ticket SPLIT - 1 loads the SPLIT
partial rows (L2 only, ``.cg``) and sums them in a fixed order (deterministic whichever program
is last), writes the (N,) result and puts the counter back to 0 for the next call. The counter
is one cached zeroed buffer (per device here; a package version needs one per stream, see
BENCHMARKS "Where the next 0.5 ms may be"). The kernel's first half is ``_colsum_kernel``
as it is, so the prototype stands alone; a package version would share it as a jit helper.

Run on a GPU: ``python scripts/device/colsum_last_reduces.py`` prints, per bias-gradient shape,
the graph-replay time of the two-launch ``colsum`` and of this one-launch version, and checks
that the results agree with float64 (as ``colsum``'s tests do) and repeat bitwise.
On a CPU: ``TRITON_INTERPRET=1 python scripts/device/colsum_last_reduces.py --check`` runs the
correctness part on small shapes through the interpreter (its programs run one after another,
so it checks the arithmetic and the counter reset, not the memory ordering).
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from affmae.ops.linear.kernel import BLOCK_M, _WARPS, _config, _vec, colsum

BLOCK_S = 32  # partial rows the last program loads at a time


@triton.jit
def _colsum_one_pass(G, PART, OUT, COUNT, M, N, stride_m, rows_per_split, split,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    N = N // VEC * VEC
    stride_m = stride_m // VEC * VEC
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    row0 = pid_s * rows_per_split
    row_end = tl.minimum(row0 + rows_per_split, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        offs = rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
        tile = tl.load(G + offs, mask=(rows < row_end)[:, None] & c_ok[None, :], other=0.0)
        acc += tile.to(tl.float32)
    tl.store(PART + pid_s.to(tl.int64) * N + cols, tl.sum(acc, 0), mask=c_ok)
    tl.debug_barrier()  # every thread's part of the row is stored before the ticket
    ticket = tl.atomic_add(COUNT + pid_n, 1, sem="acq_rel", scope="gpu")
    if ticket == split - 1:  # the last program of this column block
        total = tl.zeros([BLOCK_N], tl.float32)
        for s0 in range(0, split, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            p = tl.load(PART + rs.to(tl.int64)[:, None] * N + cols[None, :],
                        mask=(rs < split)[:, None] & c_ok[None, :], other=0.0,
                        cache_modifier=".cg")
            total += tl.sum(p, 0)
        tl.store(OUT + cols, total, mask=c_ok)
        tl.atomic_xchg(COUNT + pid_n, 0)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def colsum_one_pass(g: torch.Tensor, fresh_counter: bool = False) -> torch.Tensor:
    """``fresh_counter``: a zeroed counter per call (one memset more, no shared state: what a
    call inside a CUDA-graph capture would need when no counter exists for its stream yet)."""
    M, N = g.shape
    block_n, col_blocks, split, rows_per_split = _config(M, N)
    count = _COUNTERS.get(g.device)
    if fresh_counter:
        count = torch.zeros(col_blocks, dtype=torch.int32, device=g.device)
    elif count is None or count.numel() < col_blocks:
        count = _COUNTERS[g.device] = torch.zeros(max(col_blocks, 64), dtype=torch.int32,
                                                  device=g.device)
    part = torch.empty(split, N, dtype=torch.float32, device=g.device)
    out = torch.empty(N, dtype=torch.float32, device=g.device)
    _colsum_one_pass[(col_blocks, split)](g, part, out, count, M, N, g.stride(0), rows_per_split,
                                          split, BLOCK_M=BLOCK_M, BLOCK_N=block_n, VEC=_vec(g),
                                          BLOCK_S=BLOCK_S, num_warps=_WARPS)
    return out


def check(shapes, device) -> bool:
    ok = True
    for M, N in shapes:
        g = (torch.randn(M, N, generator=torch.Generator().manual_seed(M + N)) * 3 + 1)
        g = g.to(device).bfloat16()
        exact = g.double().sum(0)
        one, two = colsum_one_pass(g), colsum(g)
        again = colsum_one_pass(g)
        err1 = (one.double() - exact).abs().max().item()
        err2 = (two.double() - exact).abs().max().item()
        good = torch.equal(one, again) and err1 <= 2 * err2 + 1e-6 * exact.abs().max().item()
        ok &= good
        print(f"{str((M, N)):>14} split {_config(M, N)[2]:>3}: |one-pass - f64| {err1:.2e}, "
              f"|colsum - f64| {err2:.2e}, repeats bitwise {torch.equal(one, again)}  "
              f"{'ok' if good else 'FAIL'}")
    zero = all(bool((c == 0).all()) for c in _COUNTERS.values())  # keyed by g.device (cuda:0)
    print("counters back to zero:", zero)
    return ok and zero


def bench() -> None:
    from colsum_bench import graphed  # this folder is on sys.path when run as a script
    from triton.testing import do_bench

    shapes = [(32768, 384), (32768, 456), (32768, 768), (32768, 1536), (5248, 384),
              (5248, 1152), (13184, 192), (2176, 512), (32768, 96), (2176, 72)]
    print(f"{'g (M, N) bf16':>16} | {'graph us: colsum (2 launches)':>29} {'one pass':>9} "
          f"{'+ memset':>9} | saved, saved with memset")
    total = total_m = 0.0
    for M, N in shapes:
        g = torch.randn(M, N, device="cuda").bfloat16()
        t2 = do_bench(graphed(lambda: colsum(g)), return_mode="median") * 1e3
        t1 = do_bench(graphed(lambda: colsum_one_pass(g)), return_mode="median") * 1e3
        tm = do_bench(graphed(lambda: colsum_one_pass(g, True)), return_mode="median") * 1e3
        total, total_m = total + t2 - t1, total_m + t2 - tm
        print(f"{str((M, N)):>16} | {t2:29.1f} {t1:9.1f} {tm:9.1f} | {t2 - t1:5.1f} us, "
              f"{t2 - tm:5.1f} us")
    print(f"sum over these shapes: {total:.1f} us, {total_m:.1f} us with a memset per call "
          f"(aff_small makes 106 column sums per step). do_bench flushes L2 before each run, "
          f"so these are cold-cache times.")


if __name__ == "__main__":
    if "--check" in sys.argv:
        small = [(37, 96), (1000, 456), (1000, 17), (300, 1152), (2000, 72)]
        sys.exit(0 if check(small, "cpu") else 1)
    ok = check([(32768, 384), (32768, 1536), (5248, 1152), (2176, 72), (65536, 384)], "cuda")
    bench()
    sys.exit(0 if ok else 1)
