"""Heads-per-program cluster attention kernels (``kernel_hp``) against the one-head kernels
(``kernel.attention_forward`` / ``attention_backward``), on CPU through Triton's interpreter.

For small clustered inputs (batch 2, 77-123 tokens on a 32 x 32 grid, m = 8, Kc = 8,
padding N > n_valid, q/k/v as views of one packed qkv or contiguous), H in {3, 4, 6}, D in
{16, 24, 32}, float32 / float16 / bfloat16 and heads per program HP in {1, 2, 4} (HP > H
included): out, lse, dq, dk, dv and the four summed parameter gradients must equal the one-head
kernels' within float32 rounding (1e-5 of the largest value) for float32 quantities, and within
input-dtype rounding for half-precision outputs. Prints a table of max |difference| / max |value|;
exits 1 on any failure. About 3 minutes on 2 CPU cores (the interpreter is slow).

Usage: python scripts/heads_per_program_check.py
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / affmae are imported

import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from affmae.ops.cluster_attention import kernel, kernel_hp  # noqa: E402
from affmae.ops.clustering import balanced_clustering, gather_tokens, pad_tokens  # noqa: E402

# (H, D, dtype, n_valid, packed qkv, block_k, heads per program)
CASES = (
    (3, 16, torch.float32, 123, True, 32, (1, 2, 4)),  # HP = 4 > H = 3
    (4, 32, torch.float32, 101, False, 128, (2, 4)),  # one key tile per group: the "single" path
    (6, 16, torch.float16, 123, True, 32, (2, 4)),  # HP = 4: heads 6, 7 of the second program masked
    (4, 32, torch.float16, 101, True, 32, (4,)),
    (3, 24, torch.bfloat16, 77, True, 32, (2,)),  # D padded to 32
)
F32_TOL = 1e-5
HALF_TOL = {torch.float32: F32_TOL, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
NAMES = ("out", "lse", "dq", "dk", "dv", "d_w", "d_wb", "d_bk", "d_bv")


def make_inputs(B, n_valid, H, D, dtype, packed, m=8, Kc=8, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = torch.stack([torch.randperm(side * side, generator=g)[:n_valid] for _ in range(B)])
    pos = torch.stack([cells % side, cells // side], dim=-1).float()  # (B, n, 2)
    cl = balanced_clustering(pos, (side, side), m=m, num_nbr_clusters=Kc)
    N = cl.num_clusters * m
    pos_c = pad_tokens(gather_tokens(pos, cl.perm), N).contiguous()  # (B, N, 2)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(dtype)
    q, k, v = qkv.unbind(2) if packed else (t.contiguous() for t in qkv.unbind(2))
    params = (0.3 * torch.randn(H, 5, generator=g), torch.randn(H, generator=g),
              torch.randn(H, D, generator=g), torch.randn(H, D, generator=g))
    do = torch.randn(B, N, H, D, generator=g).to(dtype)
    return (q, k, v, pos_c, cl.nbr, n_valid, *params), do


def rel_err(a, b, floor=0.0):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).abs().max() / max(b.abs().max().item(), floor, 1e-30)).item()


def results(fwd, bwd, args, do, scale, grp, grp_t, **kw):
    out, lse = fwd(*args, scale, grp=grp, **kw)
    dq, dk, dv, g = bwd(do, *args[:3], lse, *args[3:], scale, grp=grp, grp_t=grp_t, **kw)
    H, D = args[-1].shape
    return (out, lse, dq, dk, dv, *g.split([5 * H, H, H * D, H * D]))


def main() -> int:
    t0 = time.time()
    header = f"{'case':<34}{'HP':>3}{'warps':>6}" + "".join(f"{n:>10}" for n in NAMES) + "  ok"
    print(header)
    print("-" * len(header))
    failures = []
    for H, D, dtype, n_valid, packed, block_k, hps in CASES:
        args, do = make_inputs(2, n_valid, H, D, dtype, packed)
        nbr, m = args[4], 8
        grp, grp_t = kernel.attention_groups(nbr, m), kernel.attention_groups(nbr, m, True)
        scale = D ** -0.5
        ref = results(kernel.attention_forward, kernel.attention_backward, args, do, scale, grp,
                      grp_t, block_k=block_k)
        half = HALF_TOL[dtype]
        tols = (half, F32_TOL, half, half, half, F32_TOL, F32_TOL, F32_TOL, F32_TOL)
        N = args[0].shape[1]
        label = (f"H={H} D={D} {str(dtype)[6:]} N={N}/{n_valid}"
                 f"{' pk' if packed else ''}{' bk' + str(block_k) if block_k != 32 else ''}")
        for hp in hps:
            got = results(kernel_hp.attention_forward_hp, kernel_hp.attention_backward_hp, args,
                          do, scale, grp, grp_t, block_k=block_k, heads_per_program=hp)
            errs = [rel_err(a, b, floor=1.0 if name == "lse" else 0.0)
                    for name, a, b in zip(NAMES, got, ref)]
            bad = [n for n, e, t in zip(NAMES, errs, tols) if not e <= t]
            warps = kernel_hp._hp_tiles(m, D, dtype, kernel.group_size(m), block_k, None, hp)["num_warps"]
            print(f"{label:<34}{hp:>3}{warps:>6}" + "".join(f"{e:>10.1e}" for e in errs)
                  + ("  ok" if not bad else "  FAIL " + ",".join(bad)), flush=True)
            failures += [f"{label} HP={hp}: {n}" for n in bad]
    print(f"tolerances (max |diff| / max |value|): float32 quantities (lse, parameter gradients and "
          f"float32 tensors) {F32_TOL:.0e}; float16 tensors 2^-10; bfloat16 tensors 2^-7")
    print(f"{time.time() - t0:.0f} s; " + ("all ok" if not failures else f"{len(failures)} FAILURES"))
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
