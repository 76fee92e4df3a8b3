"""Kernels launched by one eager training step, per model (how launch-bound a step is).

python scripts/device/count_kernels.py --models aff_small vit_small --res 512
"""

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from affmae import create_model
from affmae.bench.cli import make_batch
from affmae.bench.step import Trainer

ap = argparse.ArgumentParser()
ap.add_argument("--models", nargs="+", default=["aff_small", "vit_small"])
ap.add_argument("--res", type=int, default=512)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--compile", default="none")
args = ap.parse_args()
imgs, mask = make_batch(args.res, args.batch, 0.5, "perlin", 0, 8)
for name in args.models:
    torch.manual_seed(0)
    model = create_model(name).cuda()
    tr = Trainer(model, imgs.cuda(), mask.cuda(), compile=args.compile)
    for _ in range(3):
        tr.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tr.step()
        torch.cuda.synchronize()
    dev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in dev) / 1000
    small = sum(1 for e in dev if e.self_device_time_total < 10)
    print(f"{name} {args.res}px compile={args.compile}: {len(dev)} device events, "
          f"{total:.1f} ms device time, {small} under 10 us "
          f"(mean {1000 * total / max(1, len(dev)):.1f} us)")
    del tr, model
    torch.cuda.empty_cache()
