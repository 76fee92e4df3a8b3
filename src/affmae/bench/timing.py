"""Timing and peak memory of one op on a GPU, shared by the op benchmarks.

``time_op`` reports forward and forward + backward medians from ``triton.testing.do_bench``
(L2 flushed before each call), the peak memory one forward + backward adds above what is already
allocated, and optionally both times inside a CUDA graph (device time without launch overhead).
"""

from __future__ import annotations

from typing import Callable

import torch


def release_autograd_task() -> None:
    """Make autograd's CUDA device thread let go of the last backward's task before memory is
    read. That thread may still hold the finished task (and the gradients it returned) after
    ``backward`` / ``autograd.grad`` returned; it drops it when it takes the next task. When the
    calling thread and that thread share a core, it runs late, and a base read then counted the
    last step's gradients: peaks came out too low by their size (session 15, 9 instead of 27 MiB
    for the cluster-attention kernel with the process pinned to one core). A tiny backward on
    the device is that next task."""
    x = torch.zeros((), device="cuda", requires_grad=True)
    (x * 1.0).backward()


def time_op(forward: Callable[[], object], step: Callable[[], None], graph: bool = False) -> dict:
    """forward(): one forward (run under no_grad); step(): one forward + backward."""
    from triton.testing import do_bench, do_bench_cudagraph

    with torch.no_grad():
        fwd_ms = do_bench(forward, return_mode="median")
    step()  # compile / warm up outside the memory measurement
    fb_ms = do_bench(step, return_mode="median")
    torch.cuda.synchronize()
    release_autograd_task()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    out = dict(fwd_ms=fwd_ms, fwdbwd_ms=fb_ms, peak_mib=peak)
    if graph:
        try:
            with torch.no_grad():
                out["fwd_graph_ms"] = do_bench_cudagraph(forward, return_mode="median")
            out["fwdbwd_graph_ms"] = do_bench_cudagraph(step, return_mode="median")
        except Exception as e:  # recorded; the eager timings above stand
            out["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out
