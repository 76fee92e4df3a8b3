"""Host time of one eager cluster-attention forward + backward (Triton and reference), and a
cProfile of the Triton path: where the isolated eager call's time goes when the GPU work is
small (isolated call, and with the group structures prebuilt: shared). One GPU, about 30 s. Usage: python scripts/device/attention_host.py OUT_PREFIX"""
import cProfile
import pstats
import sys
import time

import torch

from affmae.bench.attention import _leaves, make_stage, torch_impl, triton_impl

out = sys.argv[1] if len(sys.argv) > 1 else "attention_host"
lines = []
for res, stage in ((512, 1), (512, 3)):
    s = make_stage(res, stage, 16, torch.bfloat16, "cuda")
    for name, fn in (("triton", triton_impl(s)), ("shared", triton_impl(s, shared=True)),
                     ("torch", torch_impl(s))):
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
            lines.append(f"{res} px stage {stage} {name:6s} {label:8s} host {1e3 * (t1 - t0) / n:.3f} ms/call, "
                         f"host+drain {1e3 * (t2 - t0) / n:.3f} ms/call")
            print(lines[-1], flush=True)
        if name != "torch":
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(100):
                step()
            pr.disable()
            torch.cuda.synchronize()
            with open(f"{out}_prof_{name}_{res}_{stage}.txt", "w") as fh:
                pstats.Stats(pr, stream=fh).sort_stats("tottime").print_stats(30)
with open(f"{out}.txt", "w") as fh:
    fh.write("\n".join(lines) + "\n")
