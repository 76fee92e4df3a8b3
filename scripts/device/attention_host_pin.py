"""Is the eager backward's extra host time on autograd's device thread a cross-core effect?
At 512 px stage 1 (batch 16, bf16, shared structures), host time per call, in blocks of 50 calls
alternated between the settings in one process (8 blocks each; min and median of the block
means), of:

  raw bwd, main thread      kernel.attention_backward on the calling thread
  raw bwd, 2nd thread       the same from a second Python thread (autograd runs a CUDA node's
                            backward on its own device thread)
  fn fwd+bwd                forward + torch.autograd.grad through the package's Function
  torch fwd+bwd             the reference

first with the process's threads free to run on any core, then with every thread of the
process pinned to one core (os.sched_setaffinity on each task in /proc/self/task).
Usage: python scripts/device/attention_host_pin.py OUT.txt
"""
import os
import statistics
import sys
import threading

import torch
from hostlib import block_ms

from affmae.bench.attention import _leaves, make_stage, torch_impl, triton_impl
from affmae.ops.cluster_attention import kernel

s = make_stage(512, 0, 16, torch.bfloat16, "cuda")
leaves = _leaves(s)
q, k, v, *params = leaves
do = s["do"]
grp, grp_t = kernel.attention_groups(s["nbr"], s["m"]), kernel.attention_groups(s["nbr"], s["m"], True)
args = (s["pos"], s["nbr"], s["n_valid"], *params, s["D"] ** -0.5)
with torch.no_grad():
    o, lse = kernel.attention_forward(q, k, v, *args, grp=grp)
fn, ref = triton_impl(s, shared=True), torch_impl(s)


def raw_bwd():
    kernel.attention_backward(do, q, k, v, o, lse, *args, grp=grp, grp_t=grp_t)


def fn_step():
    torch.autograd.grad(fn(*leaves), leaves, do)


def ref_step():
    torch.autograd.grad(ref(*leaves), leaves, do)


def block(f, n=50):
    return block_ms(f, n)


class Worker:
    """A second thread that runs blocks on request (so it lives across blocks, like autograd's)."""

    def __init__(self):
        self.job, self.done = threading.Event(), threading.Event()
        self.f = self.res = None
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            self.job.wait()
            self.job.clear()
            self.res = block(self.f)
            self.done.set()

    def run(self, f):
        self.f = f
        self.done.clear()
        self.job.set()
        self.done.wait()
        return self.res


def pin_all(cpus):
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cpus)


worker = Worker()
settings = {"raw bwd, main thread": lambda: block(raw_bwd), "raw bwd, 2nd thread": lambda: worker.run(raw_bwd),
            "fn fwd+bwd": lambda: block(fn_step), "torch fwd+bwd": lambda: block(ref_step)}
lines = []
everything = os.sched_getaffinity(0)
for label, cpus in (("threads free", everything), ("all threads on one core", {min(everything)})):
    pin_all(cpus)
    for f in settings.values():  # warm up (and start autograd's device thread)
        for _ in range(3):
            f()
    times = {name: [] for name in settings}
    for _ in range(8):
        for name, f in settings.items():
            times[name].append(f())
    for name, t in times.items():
        lines.append(f"{label:24s} {name:22s} min {min(t):.3f} median {statistics.median(t):.3f} ms")
        print(lines[-1], flush=True)
pin_all(everything)
with open(sys.argv[1], "w") as fh:
    fh.write(f"# {os.cpu_count()} CPUs\n" + "\n".join(lines) + "\n")
