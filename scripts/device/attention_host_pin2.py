"""Which pinning takes the eager cluster-attention call's host time down (attention_host_pin.py
showed every thread on one core halves it)? At 512 px stage 1 (batch 16, bf16, shared
structures), host time of forward + torch.autograd.grad through the package's Function and of
the reference, in blocks of 50 calls alternated in one process (6 blocks each; min / median),
with: nothing pinned; the calling thread and autograd's CUDA device thread on one core; the two
on two different cores; the device thread alone pinned; the calling thread alone pinned.
Usage: python scripts/device/attention_host_pin2.py OUT.txt
"""
import os
import statistics
import sys
import threading

import torch
from hostlib import block_ms

from affmae.bench.attention import _leaves, make_stage, torch_impl, triton_impl

s = make_stage(512, 0, 16, torch.bfloat16, "cuda")
leaves = _leaves(s)
do = s["do"]
fn, ref = triton_impl(s, shared=True), torch_impl(s)
ALL = os.sched_getaffinity(0)
A, B = sorted(ALL)[2], sorted(ALL)[5]
engine_tid = []


class _Probe(torch.autograd.Function):
    """Its backward runs on autograd's CUDA device thread: record that thread's id, and set its
    affinity when asked."""
    cpus = None

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        engine_tid[:] = [threading.get_native_id()]
        if _Probe.cpus is not None:
            os.sched_setaffinity(0, _Probe.cpus)
        return g


def set_engine(cpus):
    _Probe.cpus = cpus
    x = torch.zeros(1, device="cuda", requires_grad=True)
    _Probe.apply(x).sum().backward()


def block(f, n=50):
    return block_ms(f, n)


steps = {"fn fwd+bwd": lambda: torch.autograd.grad(fn(*leaves), leaves, do),
         "torch fwd+bwd": lambda: torch.autograd.grad(ref(*leaves), leaves, do)}
settings = {"nothing pinned": (ALL, ALL), "main + engine on one core": ({A}, {A}),
            "main, engine on two cores": ({A}, {B}), "engine pinned only": (ALL, {A}),
            "main pinned only": ({A}, ALL)}
times = {(sname, name): [] for sname in settings for name in steps}
for rnd in range(7):
    for sname, (main_cpus, engine_cpus) in settings.items():
        os.sched_setaffinity(0, main_cpus)
        set_engine(engine_cpus)
        for name, f in steps.items():
            f()
            t = block(f)
            if rnd:  # round 0 warms up
                times[(sname, name)].append(t)
os.sched_setaffinity(0, ALL)
set_engine(ALL)
lines = [f"# {len(ALL)} CPUs; cores A={A}, B={B}; engine thread {engine_tid}"]
for (sname, name), t in times.items():
    lines.append(f"{sname:28s} {name:14s} min {min(t):.3f} median {statistics.median(t):.3f} ms")
print("\n".join(lines))
with open(sys.argv[1], "w") as fh:
    fh.write("\n".join(lines) + "\n")
