"""Why an eager cluster-attention forward + backward costs ~0.7 ms more host time than its
launchers plus the autograd engine's own cost (attention_host_floor.py). Host time per call
(200 calls after 20 warm-up calls) at 512 px stage 1, batch 16, bf16, shared structures, of:

  raw bwd main          kernel.attention_backward on the calling thread
  raw bwd thread        the same 200 calls from a second Python thread (the autograd engine runs
                        a CUDA node's backward on its own device thread)
  fn fwd+bwd            the package's path (forward + torch.autograd.grad)
  fn bwd time inside    perf_counter around ClusterAttentionFunction.backward's body, summed
                        over the same calls: the backward's own host time on the engine thread
  null2 fwd+bwd         a Function that saves the same tensors and whose backward launches two
                        empty 32-argument Triton kernels and returns empty gradients
  nullraw fwd+bwd       a Function whose forward and backward call the raw launchers directly
                        (no plain_eager, no custom op, no unpack)
  torch fwd+bwd         the reference

Usage: python scripts/device/attention_host_split.py OUT.txt [--dry]
"""
import sys
import threading
import time

import torch
from hostlib import DRY, host_ms, launch_empty, stage_setup, sync

from affmae.bench.attention import torch_impl, triton_impl
from affmae.ops.cluster_attention import function as F
from affmae.ops.cluster_attention import kernel

def in_thread(f):
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("ms", host_ms(f)))
    th.start()
    th.join()
    return box["ms"]


out = sys.argv[1]
lines = []


def emit(s):
    lines.append(s)
    print(s, flush=True)


res, stage = (64, 0) if DRY else (512, 0)
x = stage_setup(res, stage)
s, leaves, q, k, v, do, grp, grp_t, args, scale, o, lse, ptrs = (
    x[n] for n in ("s", "leaves", "q", "k", "v", "do", "grp", "grp_t", "args", "scale", "o", "lse", "ptrs"))


class Null2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, wb, bk, bv):
        ctx.save_for_backward(q, k, v, w, wb, bk, bv, o, lse, grp, grp_t)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        t = ctx.saved_tensors
        for _ in range(2):
            launch_empty(ptrs)
        return tuple(torch.empty_like(x) for x in t[:7])


class NullRaw(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, wb, bk, bv):
        out, lse_ = kernel.attention_forward(q, k, v, s["pos"], s["nbr"], s["n_valid"], w, wb, bk, bv,
                                             scale, grp=grp)
        ctx.save_for_backward(q, k, v, out, lse_, w, wb, bk, bv)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse_, w, wb, bk, bv = ctx.saved_tensors
        dq, dk, dv, g = kernel.attention_backward(do, q, k, v, out, lse_, s["pos"], s["nbr"], s["n_valid"],
                                                  w, wb, bk, bv, scale, grp=grp, grp_t=grp_t)
        return (dq, dk, dv, *kernel.unpack_param_grads(g, w, wb, bk, bv))


fn, ref = triton_impl(s, shared=True), torch_impl(s)


def raw_bwd():
    kernel.attention_backward(do, q, k, v, o, lse, *args, grp=grp, grp_t=grp_t)


inside = [0.0, 0]
_orig_bwd = F.ClusterAttentionFunction.backward


def timed_bwd(ctx, d):
    t0 = time.perf_counter()
    r = _orig_bwd(ctx, d)
    inside[0] += time.perf_counter() - t0
    inside[1] += 1
    return r


r = {}
r["raw bwd main"] = host_ms(raw_bwd)
r["raw bwd thread"] = in_thread(raw_bwd)
r["fn fwd+bwd"] = host_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, do))
F.ClusterAttentionFunction.backward = staticmethod(timed_bwd)
r["fn fwd+bwd (timed)"] = host_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, do))
r["fn bwd time inside"] = 1e3 * inside[0] / inside[1]
F.ClusterAttentionFunction.backward = staticmethod(_orig_bwd)
r["null2 fwd+bwd"] = host_ms(lambda: torch.autograd.grad(Null2.apply(*leaves), leaves, do))
r["nullraw fwd+bwd"] = host_ms(lambda: torch.autograd.grad(NullRaw.apply(*leaves), leaves, do))
r["torch fwd+bwd"] = host_ms(lambda: torch.autograd.grad(ref(*leaves), leaves, do))
for name, ms in r.items():
    emit(f"{res} px stage {stage + 1}  {name:20s} {ms:.3f} ms")
if not DRY:  # which CPU-side ops and CUDA runtime calls the package's path makes, 20 calls
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            torch.autograd.grad(fn(*leaves), leaves, do)
        sync()
    emit(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50))
with open(out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
