"""Host time of one eager cluster-attention forward + backward, Triton (isolated: builds its
group structures; shared: structures prebuilt) with the cached launch (``affmae.ops.launch``)
off and on, and the reference; a cProfile of the shared Triton call with the cached launch:
where the eager call's time goes when the GPU work is small. One GPU, about 40 s.
Usage: python scripts/device/attention_host.py OUT_PREFIX"""
import cProfile
import os
import pstats
import sys
import time

import torch

from affmae.bench.attention import _leaves, make_stage, torch_impl, triton_impl
from affmae.ops import launch

out = sys.argv[1] if len(sys.argv) > 1 else "attention_host"
lines = []
for res, stage in ((512, 0), (512, 2), (768, 0)):
    s = make_stage(res, stage, 16, torch.bfloat16, "cuda")
    impls = [("triton", "0", triton_impl(s)), ("triton", "1", triton_impl(s)),
             ("shared", "0", triton_impl(s, shared=True)), ("shared", "1", triton_impl(s, shared=True)),
             ("torch", "-", torch_impl(s))]
    for name, flag, fn in impls:
        os.environ["AFFMAE_FAST_LAUNCH"] = flag if flag != "-" else "1"
        leaves = _leaves(s)

        def step():
            o = fn(*leaves)
            torch.autograd.grad(o, leaves, s["do"])

        def fwd():
            with torch.no_grad():
                fn(*leaves)

        for f, label in ((fwd, "fwd"), (step, "fwd+bwd")):
            for _ in range(10):
                f()
            torch.cuda.synchronize()
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            t1 = time.perf_counter()  # host time of n calls (GPU may still be running)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            lines.append(f"{res} px stage {stage + 1} {name:6s} fast={flag} {label:8s} host "
                         f"{1e3 * (t1 - t0) / n:.3f} ms/call, host+drain {1e3 * (t2 - t0) / n:.3f} ms/call")
            print(lines[-1], flush=True)
        if name == "shared" and flag == "1" and stage == 0 and res == 512:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(100):
                step()
            pr.disable()
            torch.cuda.synchronize()
            with open(f"{out}_prof_{res}_{stage + 1}.txt", "w") as fh:
                pstats.Stats(pr, stream=fh).sort_stats("tottime").print_stats(30)
lines.append(f"launch stats {launch.stats}")
with open(f"{out}.txt", "w") as fh:
    fh.write("\n".join(lines) + "\n")
