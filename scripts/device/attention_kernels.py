"""Device time of each cluster-attention kernel (forward, backward pass 1, the transposed
neighbourhood, backward pass 2) at aff_small's stages, 512 and 768 px, batch 16, bf16, from
torch.profiler over 20 forward + backward calls: which kernel the next optimisation should take.
One GPU, about 30 s. Usage: python scripts/device/attention_kernels.py OUT.txt"""
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from affmae.bench.attention import _leaves, make_stage, triton_impl

lines = []
for res in (512, 768):
    for stage in range(4):
        s = make_stage(res, stage, 16, torch.bfloat16, "cuda")
        fn = triton_impl(s)
        leaves = _leaves(s)

        def step():
            torch.autograd.grad(fn(*leaves), leaves, s["do"])

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step()
            torch.cuda.synchronize()
        per = collections.Counter()
        for e in prof.events():
            if e.device_type.name == "CUDA":
                per[e.name[:40]] += e.device_time_total / 20
        total = sum(per.values())
        top = ", ".join(f"{k} {v:.1f}" for k, v in per.most_common(6))
        lines.append(f"{res} px stage {stage + 1} (N={s['N']}, H={s['H']}): {total:.1f} us per "
                     f"fwd+bwd; {top}")
        print(lines[-1], flush=True)
open(sys.argv[1] if len(sys.argv) > 1 else "attention_kernels.txt", "w").write("\n".join(lines) + "\n")
