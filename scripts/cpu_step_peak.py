"""Peak of live CPU bytes over one training step, with and without the once-per-forward casts.

The profiler's memory events (``profile_memory=True``) are summed in time order: the peak of
bytes allocated since the step began. Every package Linear is put on its Triton-backed Function
(``backend="triton"``, so run with TRITON_INTERPRET=1) so that the weight casts of
``affmae.ops.linear.casts`` take part; ``0`` as the last argument turns them off.
Session 9: vit_small at 128 px, batch 2, bf16 autocast: 94.8 MiB without the casts, 125.1 with
one flat buffer of casts (it lived until the first layer's backward), 94.8 with one allocation
per cast (the design kept).
Usage: TRITON_INTERPRET=1 python scripts/cpu_step_peak.py MODEL RES {0|1}
"""

import contextlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from affmae import create_model
from affmae.bench.cli import make_batch
from affmae.ops.linear import Linear
from affmae.ops.linear.casts import no_weight_casts

name, res, casts = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
model = create_model(name)
for mod in model.modules():
    if isinstance(mod, Linear):
        mod.backend = "triton"
imgs, mask = make_batch(res, 2, 0.5, "perlin", 0, 8)
num = int(mask.sum(1)[0])


def step():
    with contextlib.nullcontext() if casts else no_weight_casts():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs, mask, num_masked=num)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)


step()  # the first step's one-off allocations stay out of the count
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                key=lambda e: e.start_ns())
live = peak = 0
for e in events:
    live += e.nbytes()
    peak = max(peak, live)
print(f"{name} {res} px, casts {'on' if casts else 'off'}: peak {peak / 2**20:.1f} MiB above "
      f"the step's start, {live / 2**20:.1f} MiB at its end")
