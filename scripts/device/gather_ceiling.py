"""How fast can the forward's key/value gathers be, on their own? (issue 3, bandwidth target)

For aff_small's stages (batch 16, bf16), the forward kernel reads, for every (cluster, head),
the Kc * m neighbour rows of k and of v (D = 32 elements, 64 bytes each): 2 * Kc = 16 times the
bytes of k and v, mostly served by L2 since neighbouring clusters share keys. This script
times a Triton kernel that does only those gathers (the same row indices, summing each block of
rows so that almost nothing is written) and prints it next to the time the issue's target asks
for: the forward's minimum bytes (q, k, v, out once, as affmae.bench.attention counts them) at
50% of the measured copy ceiling. If the gathers alone take longer, no kernel of this design
(one neighbourhood per (cluster, head), no reuse across clusters inside an SM) can meet it.
One GPU, about 20 s. Usage: python scripts/device/gather_ceiling.py OUT.txt
"""
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from affmae.bench.attention import copy_ceiling_gbs, make_stage, min_bytes


@triton.jit
def _gather_sum(T, IDX, OUT, n_idx, D: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK + tl.arange(0, BLOCK)
    ok = r < n_idx
    idx = tl.load(IDX + r, mask=ok, other=0).to(tl.int64)
    x = tl.load(T + idx[:, None] * D + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
    tl.store(OUT + pid * D + tl.arange(0, D), tl.sum(x.to(tl.float32), 0))


ceiling = copy_ceiling_gbs("cuda")
lines = [f"copy ceiling {ceiling:.0f} GB/s (read + write)"]
for res in (512, 768):
    for stage in range(4):
        s = make_stage(res, stage, 16, torch.bfloat16, "cuda")
        B, N, H, D, M, m = s["B"], s["N"], s["H"], s["D"], s["M"], s["m"]
        nbr = s["nbr"].long()  # (B, M, Kc)
        Kc = nbr.shape[-1]
        tok = (nbr[..., None] * m + torch.arange(m, device="cuda")).reshape(B, M, Kc * m)
        rows = (torch.arange(B, device="cuda")[:, None, None, None] * N + tok[:, :, None, :]) * H \
            + torch.arange(H, device="cuda")[None, None, :, None]  # (B, M, H, Kc*m) rows of (B*N*H, D)
        idx = rows.reshape(-1).to(torch.int32).contiguous()
        table = torch.randn(B * N * H, D, device="cuda", dtype=torch.bfloat16)
        BLOCK = Kc * m  # one program per (cluster, head), as the forward kernel
        n = idx.numel()
        out = torch.empty(triton.cdiv(n, BLOCK), D, device="cuda")
        grid = (triton.cdiv(n, BLOCK),)
        ms = do_bench_cudagraph(lambda: _gather_sum[grid](table, idx, out, n, D=D, BLOCK=BLOCK,
                                                         num_warps=1), return_mode="median")
        fwd_min, _ = min_bytes(s, 2)
        target_ms = fwd_min / (0.5 * ceiling * 1e9) * 1e3
        one = n * D * 2  # bytes of one gather (k or v)
        lines.append(f"{res} px stage {stage + 1}: k and v gathers {2 * one / 2**20:.0f} MiB in "
                     f"{2 * ms * 1e3:.1f} us ({one / (ms * 1e-3) / 1e9:.0f} GB/s); the 50% target "
                     f"allows {target_ms * 1e3:.1f} us for the whole forward "
                     f"({fwd_min / 2**20:.1f} MiB minimum bytes)")
        print(lines[-1], flush=True)
open(sys.argv[1] if len(sys.argv) > 1 else "gather_ceiling.txt", "w").write("\n".join(lines) + "\n")
