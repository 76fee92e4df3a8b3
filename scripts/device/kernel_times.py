"""Device time of the three cluster-attention kernels, each alone in a CUDA graph (structures
prebuilt), at aff_small's stages (512 and 768 px, batch 16, bf16): forward, backward pass 1
(``passes="q"``) and pass 2 (whole backward minus pass 1), median of ``do_bench_cudagraph``.
Also writes the outputs' checksum so two source trees can be compared. Run it once per tree
(PYTHONPATH picks the tree) and alternate trees for an A/B. About 30 s on one GPU.
``--maxnreg 0,96,80``: also time with Triton's register cap ``maxnreg`` given to every launch
(0: the package's own caps, ``kernel.MAXNREG``; to time without any, run the script through
``with_maxnreg.py none -m kernel_times``), one setting after another (register-limited occupancy: one-warp programs of 121-255
registers leave 8-16 warps per multiprocessor).
``--configs fwd:32:104,q:16:168,kv:32:128``: also time single kernels with keys per tile and a
register cap (0: the package's own): ``fwd`` the forward, ``q`` backward pass 1, ``kv`` pass 2 (the whole
backward minus pass 1, both run with the setting).
Usage: python scripts/device/kernel_times.py OUT.json [--maxnreg LIST] [--configs LIST] [--dry]
(--dry: Triton's interpreter on CPU, one tiny stage, each function run once: checks the script,
not the kernels)"""
import json
import sys

import torch

from affmae.bench.attention import make_stage
from affmae.ops.cluster_attention import kernel

DRY = "--dry" in sys.argv
if DRY:
    def bench(f):
        f()
        return 0.0
else:
    from triton.testing import do_bench_cudagraph

    def bench(f):
        return 1e3 * do_bench_cudagraph(f, return_mode="median")

CAPS = [int(x) for x in sys.argv[sys.argv.index("--maxnreg") + 1].split(",")] if "--maxnreg" in sys.argv else [0]
DEFAULT_CAPS = dict(kernel.MAXNREG)  # the package's (or with_maxnreg.py's) caps


def set_cap(n: int) -> None:
    """Every kernel capped at n registers (kernel.MAXNREG); 0: back to DEFAULT_CAPS."""
    kernel.MAXNREG.update(dict.fromkeys(kernel.MAXNREG, n) if n else DEFAULT_CAPS)


CONFIGS = sys.argv[sys.argv.index("--configs") + 1].split(",") if "--configs" in sys.argv else []
STAGES = [(64, 0)] if DRY else [(r, st) for r in (512, 768) for st in range(4)]
rows = []
for res, stage in STAGES:
    s = make_stage(res, stage, 1 if DRY else 16, torch.float32 if DRY else torch.bfloat16,
                   "cpu" if DRY else "cuda")
    grp, grp_t = kernel.attention_groups(s["nbr"], s["m"]), kernel.attention_groups(s["nbr"], s["m"], True)
    args = (s["q"], s["k"], s["v"], s["pos"], s["nbr"], s["n_valid"], *s["params"], s["D"] ** -0.5)
    o, lse = kernel.attention_forward(*args, grp=grp)
    bargs = (s["do"], *args[:3], o, lse, *args[3:])
    grads = kernel.attention_backward(*bargs, grp=grp, grp_t=grp_t)
    for n in CAPS:
        set_cap(n)
        t = [bench(f) for f in (
            lambda: kernel.attention_forward(*args, grp=grp),
            lambda: kernel.attention_backward(*bargs, grp=grp, grp_t=grp_t, passes="q"),
            lambda: kernel.attention_backward(*bargs, grp=grp, grp_t=grp_t))]
        t[2] -= t[1]
        rows.append(dict(res=res, stage=stage + 1, maxnreg=n, fwd_us=t[0], pass1_us=t[1], pass2_us=t[2],
                         sums=[float(x.double().abs().sum()) for x in (o, *grads)]))
        print(f"{res} s{stage + 1} maxnreg {n}: fwd {t[0]:.1f} pass1 {t[1]:.1f} pass2 {t[2]:.1f} us", flush=True)
    set_cap(0)
    for cfg in CONFIGS:
        which, bk, n = cfg.split(":")
        set_cap(int(n))
        kw = dict(block_k=int(bk))
        if which == "fwd":
            t = bench(lambda: kernel.attention_forward(*args, grp=grp, **kw))
        else:
            t1 = bench(lambda: kernel.attention_backward(*bargs, grp=grp, grp_t=grp_t, passes="q", **kw))
            t = t1 if which == "q" else bench(lambda: kernel.attention_backward(*bargs, grp=grp, grp_t=grp_t, **kw)) - t1
        set_cap(0)
        rows.append(dict(res=res, stage=stage + 1, config=cfg, us=t))
        print(f"{res} s{stage + 1} {cfg}: {t:.1f} us", flush=True)
total = {}
for cfg in CONFIGS:
    total[cfg] = sum(r["us"] for r in rows if r.get("config") == cfg)
    print(f"total {cfg}: {total[cfg]:.1f} us")
for n in CAPS:
    tot = [sum(r[k] for r in rows if r.get("maxnreg") == n) for k in ("fwd_us", "pass1_us", "pass2_us")]
    total[n] = tot
    print(f"total maxnreg {n}: fwd {tot[0]:.1f} pass1 {tot[1]:.1f} pass2 {tot[2]:.1f} sum {sum(tot):.1f} us")
json.dump(dict(rows=rows, total=total), open(sys.argv[1], "w"), indent=1)
