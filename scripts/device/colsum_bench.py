"""Bias-gradient column sums on CUDA: torch's ``g.sum(0)`` against ``affmae.ops.linear``'s Triton
``colsum``, then ``nn.Linear`` against ``affmae.ops.linear.Linear`` forward + backward.

Every time is ``triton.testing.do_bench``'s median (L2 flushed before each run), taken twice:
of the eager call ("eager", which includes the host's launch work whenever that is longer than
the GPU's) and of a CUDA-graph replay of the same call ("graph", GPU time alone, as in a
graph-captured training step). Part 1: both column sums of bf16 gradients of the shapes a training
step produces (M rows = tokens of a batch of 16, N = output features), with the achieved read
bandwidth (bytes of g / graph time). Part 2: one forward + backward under bf16 autocast of
``nn.Linear`` and ``Linear``, (32768, 384) float32 inputs to 384 and 1536 outputs. Prints tables
only; writes no file. One GPU, about a minute.
Usage: python scripts/device/colsum_bench.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from affmae.ops.linear import Linear
from affmae.ops.linear.kernel import colsum

SHAPES = [(32768, 384), (32768, 456), (32768, 768), (32768, 1536), (65536, 384), (65536, 1536),
          (5248, 384), (5248, 1152), (13184, 192), (2176, 512)]
LINEARS = [(32768, 384, 384), (32768, 384, 1536)]  # (M, in features, out features)


def graphed(fn):
    """``fn`` captured in a CUDA graph (after warm-up runs on a side stream): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def us(fn, **kw) -> float:
    return do_bench(fn, return_mode="median", **kw) * 1e3


def bench_colsums() -> None:
    print(f"{'g (M, N) bf16':>16} {'MiB':>6} | {'eager us: torch':>15} {'colsum':>7} | "
          f"{'graph us: torch':>15} {'colsum':>7} | {'GB/s: torch':>11} {'colsum':>7} | "
          f"{'speed-up':>8} {'max |diff|':>10}")
    for M, N in SHAPES:
        g = torch.randn(M, N, device="cuda").bfloat16()
        nbytes = g.numel() * g.element_size()
        eager = [us(lambda: g.sum(0)), us(lambda: colsum(g))]
        graph = [us(graphed(lambda: g.sum(0))), us(graphed(lambda: colsum(g)))]
        diff = (colsum(g) - g.float().sum(0)).abs().max().item()
        print(f"{str((M, N)):>16} {nbytes / 2**20:6.1f} | {eager[0]:15.1f} {eager[1]:7.1f} | "
              f"{graph[0]:15.1f} {graph[1]:7.1f} | {nbytes / graph[0] / 1e3:11.0f} "
              f"{nbytes / graph[1] / 1e3:7.0f} | {graph[0] / graph[1]:7.2f}x {diff:10.2e}")


def bench_linears() -> None:
    print(f"\n{'fwd+bwd, bf16 autocast':>30} | {'eager us: nn.Linear':>19} {'Linear':>7} | "
          f"{'graph us: nn.Linear':>19} {'Linear':>7} | {'speed-up':>8}")
    for M, K, N in LINEARS:
        torch.manual_seed(0)
        ref = torch.nn.Linear(K, N).cuda()
        mod = Linear(K, N).cuda()
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(M, K, device="cuda", requires_grad=True)
        g = torch.randn(M, N, device="cuda").bfloat16()
        eager, graph = [], []
        for m in (ref, mod):
            def step(m=m):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = m(x)
                y.backward(g)

            leaves = [x, *m.parameters()]
            eager.append(us(step, grad_to_none=leaves))
            for t in leaves:  # the captured backward allocates them from the graph's pool
                t.grad = None
            graph.append(us(graphed(step)))
        print(f"{f'({M}, {K}) -> {N}':>30} | {eager[0]:19.1f} {eager[1]:7.1f} | "
              f"{graph[0]:19.1f} {graph[1]:7.1f} | {graph[0] / graph[1]:7.2f}x")


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    bench_colsums()
    bench_linears()
