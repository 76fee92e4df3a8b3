"""Where the host time of one eager cluster-attention forward + backward goes, against floors
that no Triton implementation of this op can go under: is issue 3's ">= 5x per eager call"
reachable? Host time per call (200 calls after 20 warm-up calls; GPU work is far shorter, so the
host sets the pace) of, at aff_small's 512 px stages 1 and 3, batch 16, bf16, shared structures:

  raw fwd          kernel.attention_forward alone (checks, allocations, one Triton launch)
  raw bwd          kernel.attention_backward alone (two launches, the parameter-gradient sum)
  fn fwd           the autograd Function's forward under grad mode (no backward)
  fn fwd+bwd       forward + torch.autograd.grad: what affmae.bench.attention's eager column times
  null fwd+bwd     an autograd.Function over the same seven leaves whose forward and backward
                   only allocate their outputs (torch.empty): the autograd engine's own cost
  launch x1        one launch of an empty Triton kernel with the forward's 32 arguments
  floor            null fwd+bwd + 3 launches: this op's structure (one forward kernel, two
                   backward kernels) with free kernels and no Python of ours
  floor1           null fwd+bwd + 2 launches: a hypothetical single-kernel backward
  torch fwd+bwd    the reference, for the ratio

Usage: python scripts/device/attention_host_floor.py OUT.txt [--dry]
  --dry   Triton's interpreter on CPU, one tiny stage, 2 calls each: checks the script only
"""
import sys
import time

import torch
import triton
import triton.language as tl

from affmae.bench.attention import _leaves, make_stage, torch_impl, triton_impl
from affmae.ops.cluster_attention import kernel


@triton.jit
def _empty(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10,
           i11, i12, i13, i14, i15, i16, i17, i18, f0, C0: tl.constexpr, C1: tl.constexpr):
    pass


class _Null(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, wb, bk, bv):
        ctx.save_for_backward(q, k, v, w, wb, bk, bv)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        q, k, v, w, wb, bk, bv = ctx.saved_tensors
        return tuple(torch.empty_like(t) for t in (q, k, v, w, wb, bk, bv))


DRY = "--dry" in sys.argv
DEV = "cpu" if DRY else "cuda"
sync = (lambda: None) if DRY else torch.cuda.synchronize


def host_ms(f, n=2 if DRY else 200):
    for _ in range(1 if DRY else 20):
        f()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t1 = time.perf_counter()
    sync()
    return 1e3 * (t1 - t0) / n


out = sys.argv[1]
lines = []


def emit(s):
    lines.append(s)
    print(s, flush=True)


for res, stage in ((64, 0),) if DRY else ((512, 0), (512, 2)):
    s = make_stage(res, stage, 1 if DRY else 16, torch.float32 if DRY else torch.bfloat16, DEV)
    leaves = _leaves(s)
    q, k, v, *params = leaves
    do = s["do"]
    grp, grp_t = kernel.attention_groups(s["nbr"], s["m"]), kernel.attention_groups(s["nbr"], s["m"], True)
    scale = s["D"] ** -0.5
    args = (s["pos"], s["nbr"], s["n_valid"], *params, scale)
    with torch.no_grad():
        o, lse = kernel.attention_forward(q, k, v, *args, grp=grp)
    fn, ref = triton_impl(s, shared=True), torch_impl(s)
    ptrs = [q, k, v, s["pos"], grp, *params, o, lse]

    def launch():
        _empty[(1, 1)](*ptrs, *range(1, 20), 0.5, C0=8, C1=32)

    def null_step():
        torch.autograd.grad(_Null.apply(*leaves), leaves, do)

    def fn_step():
        torch.autograd.grad(fn(*leaves), leaves, do)

    def ref_step():
        torch.autograd.grad(ref(*leaves), leaves, do)

    def raw_fwd():
        with torch.no_grad():
            kernel.attention_forward(q, k, v, *args, grp=grp)

    def raw_bwd():
        kernel.attention_backward(do, q, k, v, o, lse, *args, grp=grp, grp_t=grp_t)

    def fn_fwd():
        fn(*leaves)

    r = {}
    for name, f in (("launch x1", launch), ("null fwd+bwd", null_step), ("raw fwd", raw_fwd),
                    ("raw bwd", raw_bwd), ("fn fwd", fn_fwd), ("fn fwd+bwd", fn_step),
                    ("torch fwd+bwd", ref_step)):
        r[name] = host_ms(f)
    r["floor"] = r["null fwd+bwd"] + 3 * r["launch x1"]
    r["floor1"] = r["null fwd+bwd"] + 2 * r["launch x1"]
    for name, ms in r.items():
        emit(f"{res} px stage {stage + 1}  {name:14s} {ms:.3f} ms   torch / this {r['torch fwd+bwd'] / ms:5.2f}x")
    emit(f"{res} px stage {stage + 1}  ours beyond the floor: {r['fn fwd+bwd'] - r['floor']:.3f} ms "
         f"(raw fwd + raw bwd - 3 launches: {r['raw fwd'] + r['raw bwd'] - 3 * r['launch x1']:.3f} ms)")
with open(out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
