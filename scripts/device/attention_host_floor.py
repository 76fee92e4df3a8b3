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

import torch
from hostlib import DRY, host_ms, launch_empty, stage_setup

from affmae.bench.attention import torch_impl, triton_impl
from affmae.ops.cluster_attention import kernel


class _Null(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, wb, bk, bv):
        ctx.save_for_backward(q, k, v, w, wb, bk, bv)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        q, k, v, w, wb, bk, bv = ctx.saved_tensors
        return tuple(torch.empty_like(t) for t in (q, k, v, w, wb, bk, bv))


out = sys.argv[1]
lines = []


def emit(s):
    lines.append(s)
    print(s, flush=True)


for res, stage in ((64, 0),) if DRY else ((512, 0), (512, 2)):
    x = stage_setup(res, stage)
    s, leaves, q, k, v, do, grp, grp_t, args, o, lse, ptrs = (
        x[n] for n in ("s", "leaves", "q", "k", "v", "do", "grp", "grp_t", "args", "o", "lse", "ptrs"))
    fn, ref = triton_impl(s, shared=True), torch_impl(s)

    def launch():
        launch_empty(ptrs)

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
