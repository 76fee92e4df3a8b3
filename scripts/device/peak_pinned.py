"""Peak memory of one eager cluster-attention forward + backward (affmae.bench.timing's method)
with and without releasing autograd's finished task before the base read, at 512 px stage 1,
batch 16, bf16: run it once free and once under ``taskset -c 3``.
Usage: python scripts/device/peak_pinned.py"""
import torch

from affmae.bench import timing
from affmae.bench.attention import _leaves, make_stage, triton_impl

s = make_stage(512, 0, 16, torch.bfloat16, "cuda")
leaves = _leaves(s)
fn = triton_impl(s, shared=True)


def step():
    torch.autograd.grad(fn(*leaves), leaves, s["do"])


for _ in range(20):
    step()
for release in (False, True, False, True):
    torch.cuda.synchronize()
    if release:
        timing.release_autograd_task()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    print(f"release={release}: base {base / 2**20:.1f} MiB, peak above base "
          f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MiB", flush=True)
