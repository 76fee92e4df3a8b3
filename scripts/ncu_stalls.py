"""Where a cluster-attention kernel's warps wait: Nsight Compute's per-instruction stall samples
joined to the kernel's source lines, without a GPU.

On the device, profile with the SourceCounters section and export the source page as CSV
(``scripts/device/verify_session20.sh`` does both):
    ncu -i REPORT.ncu-rep -k _fwd_kernel --page source --csv --print-source sass > fwd.csv
Here, this script compiles the same kernel for sm_90 as ``scripts/sass_count.py`` does (run it
with the device's Triton, 3.6.0, and the launch's register cap, or the SASS will not match: it
checks that every opcode does), takes each instruction's source line from ``nvdisasm -g``, and
prints the stall reasons of the whole kernel, the share of samples inside its loops, and the
source lines with the most samples.

Usage: python scripts/ncu_stalls.py CSV --kernel fwd|bwd_q|bwd_kv [--maxnreg N] [--stages N]
       [--top 20]
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import sass_count as S  # noqa: E402


def read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(open(path)))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr = rows[head]
    return hdr, [r for r in rows[head + 1:] if len(r) == len(hdr)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--kernel", required=True, choices=sorted(S.KERNELS))
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        sass, _usage = S.aff_small_sass(args.kernel, S.K.BLOCK_K, args.stages, args.maxnreg, work)
    ins = S.parse(sass)
    loops = S.loops(sass, ins)
    hdr, data = read_csv(args.csv)
    col = {h: j for j, h in enumerate(hdr)}
    if len(data) != len(ins) or any(op not in r[1] for r, (_a, op, _s, _t) in zip(data, ins)):
        sys.exit(f"the profiled SASS ({len(data)} instructions) is not this compile's ({len(ins)}): "
                 "check the Triton version, --maxnreg and --stages")
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    total = collections.Counter()
    per_line = collections.defaultdict(collections.Counter)
    in_loop = 0
    for r, (addr, _op, src, _t) in zip(data, ins):
        n = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        in_loop += n if any(lo <= addr <= hi for lo, hi in loops) else 0
        for h in reasons:
            v = int(r[col[h]] or 0)
            total[h] += v
            per_line[src][h] += v
    samples = sum(total.values()) or 1
    print(f"{args.kernel}: {samples} samples, {100 * in_loop / samples:.0f}% inside loops")
    print("reasons: " + ", ".join(f"{k[6:]} {100 * v / samples:.1f}%" for k, v in total.most_common(8)))
    source = open(S.K.__file__).read().splitlines()
    ranked = sorted(per_line.items(), key=lambda kv: -sum(kv[1].values()))[:args.top]
    for src, c in ranked:
        file, _, ln = src.partition(":")
        text = source[int(ln) - 1].strip()[:60] if file == "kernel.py" else ""
        top = ", ".join(f"{k[6:]} {v}" for k, v in c.most_common(3))
        print(f"{100 * sum(c.values()) / samples:5.1f}%  {src:18s} {text:60s} {top}")


if __name__ == "__main__":
    main()
