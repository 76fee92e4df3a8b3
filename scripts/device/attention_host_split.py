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
import triton
import triton.language as tl

from affmae.bench.attention import _leaves, make_stage, torch_impl, triton_impl
from affmae.ops.cluster_attention import function as F
from affmae.ops.cluster_attention import kernel

DRY = "--dry" in sys.argv
DEV = "cpu" if DRY else "cuda"
sync = (lambda: None) if DRY else torch.cuda.synchronize
N_CALLS = 2 if DRY else 200


@triton.jit
def _empty(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10,
           i11, i12, i13, i14, i15, i16, i17, i18, f0, C0: tl.constexpr, C1: tl.constexpr):
    pass


def host_ms(f, n=N_CALLS):
    for _ in range(1 if DRY else 20):
        f()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t1 = time.perf_counter()
    sync()
    return 1e3 * (t1 - t0) / n


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
s = make_stage(res, stage, 1 if DRY else 16, torch.float32 if DRY else torch.bfloat16, DEV)
leaves = _leaves(s)
q, k, v, *params = leaves
do = s["do"]
grp, grp_t = kernel.attention_groups(s["nbr"], s["m"]), kernel.attention_groups(s["nbr"], s["m"], True)
scale = s["D"] ** -0.5
args = (s["pos"], s["nbr"], s["n_valid"], *params, scale)
with torch.no_grad():
    o, lse = kernel.attention_forward(q, k, v, *args, grp=grp)
ptrs = [q, k, v, s["pos"], grp, *params, o, lse]


class Null2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, wb, bk, bv):
        ctx.save_for_backward(q, k, v, w, wb, bk, bv, o, lse, grp, grp_t)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        t = ctx.saved_tensors
        for _ in range(2):
            _empty[(1, 1)](*ptrs, *range(1, 20), 0.5, C0=8, C1=32)
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
