"""Kernels of one replayed (CUDA-graph) training step: count, busy time, gaps, largest names.

`affmae bench --profile` profiles an eager step (its kernels' durations, not the graph's
timeline). This replays the captured step under torch.profiler and reads the kernel events of
the replays: how many kernels one step runs, their summed duration against the step's span
(the rest is the gaps between kernels), how the durations spread, and which kernel names take
the most time. Session 8.
Usage: python scripts/device/graph_timeline.py [--models aff_small vit_small] [--res 512]
Lines are flushed as they are printed: a call cut by its time limit keeps the models finished
(session 8's first run under `timeout` lost its buffered output).
"""

from __future__ import annotations

import argparse
import functools
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from affmae import create_model
from affmae.bench.cli import make_batch
from affmae.bench.step import Trainer

print = functools.partial(print, flush=True)  # noqa: A001  (see the module docstring)

p = argparse.ArgumentParser()
p.add_argument("--models", nargs="+", default=["aff_small", "vit_small"])
p.add_argument("--res", type=int, default=512)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--replays", type=int, default=3)
p.add_argument("--top", type=int, default=25)
a = p.parse_args()
dev = torch.device("cuda")
imgs, mask = make_batch(a.res, a.batch, 0.5, "perlin", 0, 8)
for name in a.models:
    torch.manual_seed(0)
    model = create_model(name).to(dev)
    tr = Trainer(model, imgs.to(dev), mask.to(dev), dtype="bf16", cuda_graph=True)
    for _ in range(3):
        tr.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.replays):
            tr.step()
        torch.cuda.synchronize()
    kern = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                  key=lambda e: e.time_range.start)
    if not kern:
        print(f"{name}: no kernel events (CUPTI does not trace graph kernels here)")
        continue
    n = len(kern) / a.replays
    busy = sum(e.time_range.elapsed_us() for e in kern) / a.replays
    span = (kern[-1].time_range.end - kern[0].time_range.start) / a.replays
    small = [e.time_range.elapsed_us() for e in kern if e.time_range.elapsed_us() < 10]
    print(f"\n{name} {a.res}px batch {a.batch}: {n:.0f} kernels per step, busy {busy / 1e3:.2f} ms, "
          f"span {span / 1e3:.2f} ms, gaps {(span - busy) / 1e3:.2f} ms "
          f"({(span - busy) / max(n, 1):.2f} us per kernel)")
    print(f"  under 10 us: {len(small) / a.replays:.0f} kernels, "
          f"{sum(small) / a.replays / 1e3:.2f} ms")
    by: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in kern:
        by[e.name][0] += e.time_range.elapsed_us() / a.replays
        by[e.name][1] += 1 / a.replays
    print(f"  {'us/step':>8s} {'calls':>6s}  kernel")
    for k, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"  {t:8.1f} {c:6.0f}  {k[:110]}")
    del tr, model
    torch.cuda.empty_cache()
