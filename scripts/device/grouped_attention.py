"""Grouped cluster-attention kernels (G clusters per program) against the per-cluster kernels.

``python scripts/device/grouped_attention.py OUT [--res 512 768] [--configs 2:64 4:64 8:64]``

For the aff_small stage inputs of ``affmae.bench.attention`` (batch 16, bf16): device time
(``do_bench_cudagraph``, median) of the forward and of the backward (both passes and the
parameter-gradient sum) for ``kernel.py`` (nbr_t prebuilt, as the model does) and for
``grouped.py`` at each G:BLOCK_K (group structures prebuilt; their build is timed separately),
the largest difference of every output against the per-cluster kernels, and the bandwidth as
``affmae.bench.attention`` counts it (minimum bytes over time, % of a measured copy).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench_cudagraph

from affmae.bench.attention import copy_ceiling_gbs, make_stage, min_bytes
from affmae.ops.cluster_attention import grouped, kernel


def bench(fn) -> float:
    if not torch.cuda.is_available():  # dry run: check that everything runs
        fn()
        return float("nan")
    return do_bench_cudagraph(fn, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--res", type=int, nargs="+", default=[512, 768])
    ap.add_argument("--configs", nargs="+", default=["2:32", "2:16", "1:32", "4:32"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device(a.device)
    ceil = copy_ceiling_gbs(dev) * 1e9 if dev.type == "cuda" else 1e12
    print(f"# {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'} copy ceiling {ceil / 1e9:.0f} GB/s", flush=True)
    rows = []
    for res in a.res:
        for stage in range(4):
            s = make_stage(res, stage, a.batch, torch.bfloat16, dev)
            args = (s["q"], s["k"], s["v"], s["pos"], s["nbr"], s["n_valid"], *s["params"], s["D"] ** -0.5)
            nbr_t = kernel.transposed_neighbourhood(s["nbr"])
            out0, lse0 = kernel.attention_forward(*args)
            bargs = (s["do"], *args[:3], lse0, *args[3:])
            ref = (out0, *kernel.attention_backward(*bargs, nbr_t=nbr_t))
            fb, bb = min_bytes(s, 2)
            row = dict(res=res, stage=stage + 1, N=s["N"], H=s["H"],
                       base_nbr_t_count=bench(lambda: kernel.transposed_neighbourhood(s["nbr"], "count")),
                       base_nbr_t_sort=bench(lambda: kernel.transposed_neighbourhood(s["nbr"], "sort")),
                       base_fwd=bench(lambda: kernel.attention_forward(*args)),
                       base_bwd=bench(lambda: kernel.attention_backward(*bargs, nbr_t=nbr_t)))
            for cfg in a.configs:
                G, bk = map(int, cfg.split(":"))
                grp = grouped.group_neighbourhood(s["nbr"], G)
                grp_t = grouped.group_neighbourhood(s["nbr"], G, transpose=True)
                kw = dict(G=G, block_k=bk)
                out, lse = grouped.grouped_forward(*args, grp=grp, **kw)
                gb = (s["do"], *args[:3], lse, *args[3:])
                res_g = (out, *grouped.grouped_backward(*gb, grp=grp, grp_t=grp_t, **kw))
                row[f"{cfg}_diff"] = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
                                         for x, y in zip(res_g, ref))  # relative to the largest value
                row[f"{cfg}_lse_diff"] = (lse - lse0).abs().max().item()
                row[f"{cfg}_fwd"] = bench(lambda: grouped.grouped_forward(*args, grp=grp, **kw))
                row[f"{cfg}_bwd"] = bench(lambda: grouped.grouped_backward(*gb, grp=grp, grp_t=grp_t, **kw))
                row[f"{cfg}_bwd_q"] = bench(lambda: grouped.grouped_backward(*gb, grp=grp, grp_t=grp_t, passes="q", **kw))
                row[f"{cfg}_build"] = bench(lambda: grouped.group_neighbourhood(s["nbr"], G))
                for meth in ("count", "sort"):
                    row[f"{cfg}_build_t_{meth}"] = bench(
                        lambda: grouped.group_neighbourhood(s["nbr"], G, transpose=True, method=meth))
                nG = grouped.num_groups(s["M"], G)
                row[f"{cfg}_union"] = (grp[:, nG:2 * nG] - grp[:, :nG]).float().mean().item()
            parts = [f"{res}px s{stage + 1} N={s['N']} H={s['H']} | base fwd {row['base_fwd'] * 1e3:.1f} "
                     f"bwd {row['base_bwd'] * 1e3:.1f} nbr_t count/sort {row['base_nbr_t_count'] * 1e3:.1f}/"
                     f"{row['base_nbr_t_sort'] * 1e3:.1f} us (bw {100 * fb / (row['base_fwd'] * 1e-3) / ceil:.0f}% / "
                     f"{100 * (fb + bb) / ((row['base_fwd'] + row['base_bwd']) * 1e-3) / ceil:.0f}%)"]
            for cfg in a.configs:
                f_, b_ = row[f"{cfg}_fwd"], row[f"{cfg}_bwd"]
                parts.append(f"G{cfg} fwd {f_ * 1e3:.1f} bwd {b_ * 1e3:.1f} (q {row[f'{cfg}_bwd_q'] * 1e3:.1f}) "
                             f"build {row[f'{cfg}_build'] * 1e3:.1f} t {row[f'{cfg}_build_t_count'] * 1e3:.1f}/"
                             f"{row[f'{cfg}_build_t_sort'] * 1e3:.1f} "
                             f"(bw {100 * fb / (f_ * 1e-3) / ceil:.0f}% / {100 * (fb + bb) / ((f_ + b_) * 1e-3) / ceil:.0f}%) "
                             f"union/grp {row[f'{cfg}_union']:.1f} diff {row[f'{cfg}_diff']:.1e}")
            print(" | ".join(parts), flush=True)
            rows.append(row)
            with open(os.path.join(a.out, "grouped_attention.json"), "w") as f:
                json.dump(dict(ceiling_gbs=ceil / 1e9, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
