"""Shared by the host-time probes (attention_host_{floor,split,pin,pin2}.py): an empty Triton
kernel with the forward kernel's 32 runtime arguments, and host time per call of a function.
``--dry`` on a probe's command line runs on CPU through Triton's interpreter, a few calls each."""
import sys
import time

import torch
import triton
import triton.language as tl

DRY = "--dry" in sys.argv
DEV = "cpu" if DRY else "cuda"
sync = (lambda: None) if DRY else torch.cuda.synchronize


@triton.jit
def empty32(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10,
            i11, i12, i13, i14, i15, i16, i17, i18, f0, C0: tl.constexpr, C1: tl.constexpr):
    pass


def launch_empty(ptrs):
    """One launch of ``empty32`` with 11 tensors (``ptrs``), 19 ints and a float."""
    empty32[(1, 1)](*ptrs, *range(1, 20), 0.5, C0=8, C1=32)


def block_ms(f, n: int) -> float:
    """Host time per call of n calls of f (the GPU drained before and after)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t1 = time.perf_counter()
    sync()
    return 1e3 * (t1 - t0) / n


def host_ms(f, n: int = 2 if DRY else 200) -> float:
    """``block_ms`` after 20 warm-up calls (1 when dry)."""
    for _ in range(1 if DRY else 20):
        f()
    return block_ms(f, n)


def stage_setup(res: int, stage: int) -> dict:
    """One aff_small stage's inputs (batch 16, bf16 on CUDA; batch 1, float32 on CPU when dry),
    its two group structures, the launchers' other arguments, a forward's (o, lse), and the 11
    tensors ``launch_empty`` takes."""
    from affmae.bench.attention import _leaves, make_stage
    from affmae.ops.cluster_attention import kernel

    s = make_stage(res, stage, 1 if DRY else 16, torch.float32 if DRY else torch.bfloat16, DEV)
    leaves = _leaves(s)
    q, k, v, *params = leaves
    grp, grp_t = kernel.attention_groups(s["nbr"], s["m"]), kernel.attention_groups(s["nbr"], s["m"], True)
    args = (s["pos"], s["nbr"], s["n_valid"], *params, s["D"] ** -0.5)
    with torch.no_grad():
        o, lse = kernel.attention_forward(q, k, v, *args, grp=grp)
    return dict(s=s, leaves=leaves, q=q, k=k, v=v, params=params, do=s["do"], grp=grp, grp_t=grp_t,
                args=args, scale=s["D"] ** -0.5, o=o, lse=lse, ptrs=[q, k, v, s["pos"], grp, *params, o, lse])
