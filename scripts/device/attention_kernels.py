"""Device time of each cluster-attention kernel (the group structures, forward, backward pass 1,
backward pass 2) at aff_small's stages, 512 and 768 px, batch 16, bf16, from torch.profiler over
20 forward + backward calls: which kernel the next optimisation should take; and the two ways
to build the key-major group structure ("count", one Triton kernel, and "sort", torch.sort +
searchsorted), each timed alone in a CUDA graph. One GPU, about 40 s. Usage: python scripts/device/attention_kernels.py OUT.txt"""
import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench_cudagraph

from affmae.ops.cluster_attention.kernel import group_neighbourhood, group_size

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
        G = group_size(s["m"])
        count, by_sort = (group_neighbourhood(s["nbr"], G, True, method=m) for m in ("count", "sort"))
        assert torch.equal(count, by_sort), "the two builds differ"
        build = {m: 1e3 * do_bench_cudagraph(lambda m=m: group_neighbourhood(s["nbr"], G, True, method=m),
                                             return_mode="median") for m in ("count", "sort")}
        lines.append(f"{res} px stage {stage + 1} (N={s['N']}, H={s['H']}): {total:.1f} us per "
                     f"fwd+bwd; {top}; key-major group structure alone: count {build['count']:.1f} us, "
                     f"sort {build['sort']:.1f} us")
        print(lines[-1], flush=True)
open(sys.argv[1] if len(sys.argv) > 1 else "attention_kernels.txt", "w").write("\n".join(lines) + "\n")
