"""Heads per program (``kernel_hp``) vs the one-head cluster-attention kernels on one GPU.
Needs commit 908e95e (src/affmae/ops/cluster_attention/kernel_hp.py, removed in c2c7ced after this
script measured it slower: docs/bench/heads_per_program_h200_session13.txt).

aff_small's stages (``affmae.bench.attention.make_stage``, batch 16, bf16) at 512 and 768 px:
forward and backward (both passes) device time, ``triton.testing.do_bench_cudagraph`` median,
of ``kernel.attention_forward`` / ``attention_backward`` (default tiling, prebuilt group
structures) and of ``kernel_hp.attention_forward_hp`` / ``attention_backward_hp`` for heads per
program HP in {1, 2, 4, 8} (HP <= next_pow2(H)) and num_warps in {1, 2, 4}. Each HP variant is
first checked against the one-head kernels (max |diff| / max |value| over out, lse, dq, dk, dv
and the packed parameter gradient; bf16 tolerance 2e-2). One line per (res, stage), all times in
microseconds; errors are printed, never fatal. About 2-3 minutes on an H200 (compilation
included). Usage: python scripts/device/heads_per_program.py OUT.txt
"""
import sys
import time
import traceback

import torch
import triton
from triton.testing import do_bench_cudagraph

from affmae.bench.attention import make_stage
from affmae.ops.cluster_attention import kernel, kernel_hp

HPS = (1, 2, 4, 8)
WARPS = (1, 2, 4)
TOL = 2e-2
REP_MS = 10  # do_bench_cudagraph repetition time per measurement
BUDGET_S = 165  # stop timing new variants past this (the script must stay under ~3 minutes)


def bench_us(fn) -> float:
    return 1e3 * do_bench_cudagraph(fn, rep=REP_MS, return_mode="median")


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main() -> int:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "heads_per_program.txt"
    t0 = time.time()
    lines = []
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, torch {torch.__version__}",
          flush=True)
    for res in (512, 768):
        for stage in range(4):
            label = f"{res} px stage {stage}"
            try:
                s = make_stage(res, stage, 16, torch.bfloat16, "cuda")
                H, D, m = s["H"], s["D"], s["m"]
                args = (s["q"], s["k"], s["v"], s["pos"], s["nbr"], s["n_valid"], *s["params"],
                        D ** -0.5)
                grp = kernel.attention_groups(s["nbr"], m)
                grp_t = kernel.attention_groups(s["nbr"], m, transpose=True)
                do = s["do"]
                label += f" (B={s['B']} N={s['N']} H={H} D={D})"
                out, lse = kernel.attention_forward(*args, grp=grp)
                ref = (out, lse, *kernel.attention_backward(do, *args[:3], lse, *args[3:], grp=grp,
                                                            grp_t=grp_t))
                fields = [
                    f"base fwd {bench_us(lambda: kernel.attention_forward(*args, grp=grp)):.1f}",
                    f"bwd {bench_us(lambda: kernel.attention_backward(do, *args[:3], lse, *args[3:], grp=grp, grp_t=grp_t)):.1f}",
                ]
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                lines.append(f"{label}: base failed: {type(e).__name__}: {e}")
                print(lines[-1], flush=True)
                continue
            for hp in HPS:
                if hp > triton.next_power_of_2(H):
                    continue
                for nw in WARPS:
                    name = f"hp{hp}w{nw}"
                    if time.time() - t0 > BUDGET_S:
                        fields.append(f"{name} skipped (time budget)")
                        continue
                    try:
                        kw = dict(heads_per_program=hp, num_warps=nw)
                        o, l_ = kernel_hp.attention_forward_hp(*args, grp=grp, **kw)
                        got = (o, l_, *kernel_hp.attention_backward_hp(
                            do, *args[:3], l_, *args[3:], grp=grp, grp_t=grp_t, **kw))
                        err = max(rel(a, b) for a, b in zip(got, ref))
                        flag = "" if err <= TOL else " MISMATCH"
                        f_us = bench_us(lambda: kernel_hp.attention_forward_hp(*args, grp=grp, **kw))
                        b_us = bench_us(lambda: kernel_hp.attention_backward_hp(
                            do, *args[:3], lse, *args[3:], grp=grp, grp_t=grp_t, **kw))
                        fields.append(f"{name} fwd {f_us:.1f} bwd {b_us:.1f} err {err:.1e}{flag}")
                    except Exception as e:  # noqa: BLE001
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
                        print(f"{label} {name} failed: {msg}", flush=True)
                        fields.append(f"{name} failed ({msg})")
            lines.append(f"{label} [us]: " + "; ".join(fields))
            print(lines[-1], flush=True)
            with open(out_path, "w") as f:  # rewritten per line: partial results survive a kill
                f.write("\n".join(lines) + "\n")
    lines.append(f"total {time.time() - t0:.0f} s")
    print(lines[-1])
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
