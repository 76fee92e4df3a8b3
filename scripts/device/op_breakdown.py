"""Which backward nodes and shapes the generic ops of one aff_small step come from (session 6).

`affmae bench --profile` attributes each kernel to a model label; this lists, for the ops named
(default aten::sum, aten::copy_, aten::mul, aten::add), the device time grouped by the autograd
node (or forward op) that ran them and by input shapes, largest first.
Usage: python scripts/device/op_breakdown.py [--res 512] [--model aff_small] [--top 40]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from affmae import create_model
from affmae.bench.cli import make_batch
from affmae.bench.step import Trainer

p = argparse.ArgumentParser()
p.add_argument("--res", type=int, default=512)
p.add_argument("--model", default="aff_small")
p.add_argument("--batch", type=int, default=16)
p.add_argument("--top", type=int, default=40)
p.add_argument("--ops", nargs="+", default=["aten::sum", "aten::copy_", "aten::mul", "aten::add",
                                             "aten::mm", "aten::addmm"],
               help="aten op names, or 'all' for every op that ran a kernel")
a = p.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
imgs, mask = make_batch(a.res, a.batch, 0.5, "perlin", 0, 8)
torch.manual_seed(0)
model = create_model(a.model).to(dev)
tr = Trainer(model, imgs.to(dev), mask.to(dev), dtype="bf16" if dev.type == "cuda" else "fp32")
for _ in range(3):
    tr.step()
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
with profile(activities=acts, record_shapes=True) as prof:
    tr.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()


def owner(evt):
    node, label = evt.cpu_parent, None
    while node is not None:
        if node.name.startswith("autograd::engine::evaluate_function: "):
            return node.name.split(": ", 1)[1]
        if node.is_user_annotation and label is None:
            label = node.name
        node = node.cpu_parent
    return f"fwd[{label}]"


on_dev = dev.type == "cuda"
groups: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
total: dict[str, float] = defaultdict(float)
for e in prof.events():
    if e.device_type != DeviceType.CPU or (a.ops != ["all"] and e.name not in a.ops):
        continue
    t = float(e.self_device_time_total if on_dev else e.self_cpu_time_total)
    if t <= 0:
        continue
    key = (e.name, owner(e), str(e.input_shapes)[:90])
    groups[key][0] += t
    groups[key][1] += 1
    total[e.name] += t
print(f"{a.model} {a.res}px batch {a.batch} on {dev}: us per op name:",
      {k: round(v) for k, v in total.items()})
print(f"{'op':12s} {'owner':34s} {'calls':>5s} {'us':>8s}  shapes")
for (name, own, shapes), (t, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:a.top]:
    print(f"{name:12s} {own[:34]:34s} {n:5d} {t:8.1f}  {shapes}")
