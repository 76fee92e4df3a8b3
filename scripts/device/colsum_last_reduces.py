"""One-launch column sums: ``affmae.ops.linear.kernel.colsum`` against the two launches it replaced.

``colsum`` used to be two launches: the Triton kernel wrote (SPLIT, N) float32 partials, then
``partials.sum(0)`` (a PyTorch reduce kernel) added them. Together with the layer-norm
backward's ``part.sum(-1)`` that second stage was most of the 203 ``reduce_kernel`` launches
(1.11 ms) of a replayed aff_small step at 512 px (session 9's timeline). Now the last program of
each column block adds the partials in the same launch (ticket counters, fixed order: colsum's
docstring and ``affmae.ops._last_reduces_kernel``).

For the A/B this script keeps a local copy of the old two-stage path, ``two_stage``: the same
kernel with REDUCE=False, which stores every partial row and stops there, then
``partials.sum(0)``. It also runs colsum's kernel with a zeroed counter per call,
``one_pass_memset``: what a CUDA-graph capture records when no counter buffer was warmed for
its stream (``affmae.ops._tickets``: one memset per call).

Run on a GPU: ``python scripts/device/colsum_last_reduces.py`` checks, per bias-gradient shape,
that colsum agrees with float64 as well as the two-stage sum does (as colsum's tests ask),
repeats bitwise over 20 calls and leaves its counters at zero; then prints the graph-replay
times of the two-stage path, of colsum (counters warmed for the capture stream) and of colsum
with a memset per call. On a CPU: ``TRITON_INTERPRET=1 python
scripts/device/colsum_last_reduces.py --check`` runs the correctness part on small shapes
through the interpreter (its programs run one after another, so it checks the arithmetic and
the counter reset, not the memory ordering).
"""

from __future__ import annotations

import sys

import torch

from affmae.ops import _tickets
from affmae.ops.linear.kernel import BLOCK_M, _WARPS, _colsum_kernel, _config, _vec, colsum


def _launch(g: torch.Tensor, reduce: bool, count: torch.Tensor | None = None):
    """colsum's kernel on a contiguous (M, N) ``g`` with M > 0 -> (partials, out)."""
    M, N = g.shape
    block_n, col_blocks, split, rows_per_split = _config(M, N)
    part = torch.empty(split, N, dtype=torch.float32, device=g.device)
    out = torch.empty(N, dtype=torch.float32, device=g.device)
    if count is None:
        count = out  # REDUCE=False: unused
    _colsum_kernel[(col_blocks, split)](g, part, out, count, M, N, g.stride(0), rows_per_split,
                                        split, BLOCK_M=BLOCK_M, BLOCK_N=block_n, VEC=_vec(g),
                                        REDUCE=reduce and split > 1, num_warps=_WARPS)
    return part, out


def two_stage(g: torch.Tensor) -> torch.Tensor:
    """The old colsum: every partial row stored, then a PyTorch reduction (two launches)."""
    part, _ = _launch(g, reduce=False)
    return part[0] if part.shape[0] == 1 else part.sum(0)


def one_pass_memset(g: torch.Tensor) -> torch.Tensor:
    """colsum with a zeroed counter per call (a memset more, no cached state)."""
    count = torch.zeros(_config(*g.shape)[1], dtype=torch.int32, device=g.device)
    part, out = _launch(g, reduce=True, count=count)
    return out if part.shape[0] > 1 else part[0]


def check(shapes, device) -> bool:
    ok = True
    for M, N in shapes:
        g = (torch.randn(M, N, generator=torch.Generator().manual_seed(M + N)) * 3 + 1)
        g = g.to(device).bfloat16()
        exact = g.double().sum(0)
        one, two, memset = colsum(g), two_stage(g), one_pass_memset(g)
        repeats = all(torch.equal(one, colsum(g)) for _ in range(20))
        err1 = (one.double() - exact).abs().max().item()
        err2 = (two.double() - exact).abs().max().item()
        good = (repeats and torch.equal(one, memset)
                and err1 <= 2 * err2 + 1e-6 * exact.abs().max().item())
        ok &= good
        print(f"{str((M, N)):>14} split {_config(M, N)[2]:>3}: |colsum - f64| {err1:.2e}, "
              f"|two-stage - f64| {err2:.2e}, repeats bitwise {repeats}, = with memset "
              f"{torch.equal(one, memset)}  {'ok' if good else 'FAIL'}")
    count = _tickets.cached(device)
    zero = count is None or not bool(count.any())
    print("counters back to zero:", zero)
    return ok and zero


def bench() -> None:
    from colsum_bench import graphed  # this folder is on sys.path when run as a script
    from triton.testing import do_bench

    # ``graphed`` warms the counters of its capture stream (torch.cuda.graph's default one) as
    # the package's captures do; the assert below checks that colsum's capture found them
    shapes = [(32768, 384), (32768, 456), (32768, 768), (32768, 1536), (5248, 384),
              (5248, 1152), (13184, 192), (2176, 512), (32768, 96), (2176, 72)]
    print(f"{'g (M, N) bf16':>16} | {'graph us: two-stage':>19} {'colsum':>7} "
          f"{'+ memset':>9} | saved, saved with memset")
    total = total_m = 0.0
    for M, N in shapes:
        g = torch.randn(M, N, device="cuda").bfloat16()
        t2 = do_bench(graphed(lambda: two_stage(g)), return_mode="median") * 1e3
        before = _tickets.fresh_in_capture
        t1 = do_bench(graphed(lambda: colsum(g)), return_mode="median") * 1e3
        assert _tickets.fresh_in_capture == before, "colsum's capture found no warmed counters"
        tm = do_bench(graphed(lambda: one_pass_memset(g)), return_mode="median") * 1e3
        total, total_m = total + t2 - t1, total_m + t2 - tm
        print(f"{str((M, N)):>16} | {t2:19.1f} {t1:7.1f} {tm:9.1f} | {t2 - t1:5.1f} us, "
              f"{t2 - tm:5.1f} us")
    print(f"sum over these shapes: {total:.1f} us, {total_m:.1f} us with a memset per call "
          f"(aff_small makes 106 column sums per step). do_bench flushes L2 before each run, "
          f"so these are cold-cache times.")


if __name__ == "__main__":
    if "--check" in sys.argv:
        small = [(37, 96), (1000, 456), (1000, 17), (300, 1152), (2000, 72), (5120, 17)]
        sys.exit(0 if check(small, "cpu") else 1)
    ok = check([(32768, 384), (32768, 1536), (5248, 1152), (2176, 72), (65536, 384)], "cuda")
    bench()
    sys.exit(0 if ok else 1)
