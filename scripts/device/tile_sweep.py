"""Launch parameters of the three cluster-attention kernels after the single-sweep backward pass 1
(session 14): keys per tile, warps and software-pipelining stages, each kernel timed alone in a
CUDA graph (structures prebuilt) at aff_small's stages, 512 and 768 px, batch 16, bf16.
Forward: ``attention_forward``; pass 1: ``attention_backward(passes="q")``; pass 2: the whole
backward minus pass 1. Each line also gives the largest difference of every output from the
first setting's (keys per tile change the summation order). About 3 minutes on one GPU.
Usage: python scripts/device/tile_sweep.py OUT.txt [--dry] (--dry: Triton's interpreter on CPU,
one tiny stage, each function run once instead of timed: checks the script, not the kernels)"""
import itertools
import sys

import torch
from triton.testing import do_bench_cudagraph

from affmae.bench.attention import make_stage
from affmae.ops.cluster_attention import kernel

_orig = kernel._tiles
extra = {}


def _tiles(*a, **kw):
    t = _orig(*a, **kw)
    t.update(extra)
    return t


kernel._tiles = _tiles
configs = [dict(block_k=16, num_warps=1, num_stages=3)] + [
    dict(block_k=bk, num_warps=nw, num_stages=ns)
    for bk, nw, ns in itertools.product((32, 64), (1, 2), (1, 2, 3, 4))]
DRY = "--dry" in sys.argv
if DRY:
    def do_bench_cudagraph(f, return_mode):
        f()
        return 0.0
STAGES = [(64, 0)] if DRY else [(r, st) for r in (512, 768) for st in range(4)]
lines = []
results = {}
for res, stage in STAGES:
    if True:
        s = make_stage(res, stage, 1 if DRY else 16, torch.float32 if DRY else torch.bfloat16,
                       "cpu" if DRY else "cuda")
        G = kernel.group_size(s["m"])
        grp, grp_t = kernel.attention_groups(s["nbr"], s["m"]), kernel.attention_groups(s["nbr"], s["m"], True)
        args = (s["q"], s["k"], s["v"], s["pos"], s["nbr"], s["n_valid"], *s["params"], s["D"] ** -0.5)
        ref = None
        for c in configs:
            extra.clear()
            extra["num_stages"] = c["num_stages"]
            kw = dict(block_k=c["block_k"], num_warps=c["num_warps"])
            try:
                o, lse = kernel.attention_forward(*args, grp=grp, **kw)
                bargs = (s["do"], *args[:3], o, lse, *args[3:])
                got = kernel.attention_backward(*bargs, grp=grp, grp_t=grp_t, **kw)
                if ref is None:
                    ref = (o, *got)
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, (o, *got)))
                t = [1e3 * do_bench_cudagraph(f, return_mode="median") for f in (
                    lambda: kernel.attention_forward(*args, grp=grp, **kw),
                    lambda: kernel.attention_backward(*bargs, grp=grp, grp_t=grp_t, passes="q", **kw),
                    lambda: kernel.attention_backward(*bargs, grp=grp, grp_t=grp_t, **kw))]
                t[2] -= t[1]
                key = (c["block_k"], c["num_warps"], c["num_stages"])
                results.setdefault(key, []).append(t)
                lines.append(f"{res} s{stage + 1} k{key[0]} w{key[1]} st{key[2]}: fwd {t[0]:.1f} "
                             f"q {t[1]:.1f} kv {t[2]:.1f} us (max diff {err:.2e})")
            except Exception as e:
                lines.append(f"{res} s{stage + 1} {c}: {type(e).__name__}: {str(e)[:200]}")
            print(lines[-1], flush=True)
        open(sys.argv[1], "w").write("\n".join(lines) + "\n")
lines.append("\n# totals over the stages (us): fwd, pass 1, pass 2; best 8 by sum")
tot = {k: [sum(x[i] for x in v) for i in range(3)] for k, v in results.items() if len(v) == len(STAGES)}
for name, i in (("fwd", 0), ("q", 1), ("kv", 2)):
    best = sorted(tot, key=lambda k: tot[k][i])[:5]
    lines.append(f"best {name}: " + "; ".join(f"k{k[0]} w{k[1]} st{k[2]} {tot[k][i]:.1f}" for k in best))
default = tot.get((32, 1, 3)) or tot.get((32, 1, 2))
lines.append(f"default-like (k32 w1 st3): {default}")
for k in sorted(tot, key=lambda k: sum(tot[k]))[:8]:
    lines.append(f"k{k[0]} w{k[1]} st{k[2]}: fwd {tot[k][0]:.1f} q {tot[k][1]:.1f} kv {tot[k][2]:.1f} sum {sum(tot[k]):.1f}")
print("\n".join(lines[-15:]))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
