"""SASS instruction counts of the three cluster-attention kernels, without a GPU.

Compiles ``_fwd_kernel``, ``_bwd_q_kernel`` and ``_bwd_kv_kernel`` for sm_90 with Triton's bundled
ptxas (aff_small's shapes: m = 8, head dim 32, two clusters per program, bf16), disassembles them
with ``nvdisasm -g`` and prints, per kernel: registers, spill instructions, instructions in all and
in each loop (a backward branch's range), by opcode. ``--lines`` adds the attention loop's instructions
per source line (the line numbers ``-g`` records), the quickest way to see what a logit costs.

Pointers and the token strides are marked divisible by 16, as Triton specialises them at run time
for aff_small's stage 1, so the gathers compile to the same vector copies as on the device. The
counts come from the Triton that runs the script. To see exactly what the device compiles, run it
with the device's version (Triton 3.6.0 there, session 18: `pip download triton==3.6.0 --no-deps`,
install it into a `python -m venv --system-site-packages` environment and run the script with that
environment's python; its register counts matched Nsight Compute's on the H100: forward 122,
pass 2 143).

Usage: python scripts/sass_count.py [--lines] [--block-k 32] [--stages 2] [--maxnreg N]
                                    [--kernels fwd,bwd_q,bwd_kv] [--dump DIR]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from affmae.ops.cluster_attention import kernel as K

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
BF, F32, I32 = "*bf16", "*fp32", "*i32"
KERNELS = {
    "fwd": (K._fwd_kernel, dict(Q=BF, K=BF, V=BF, POS=F32, GRP=I32, W=F32, WB=F32, BK=F32, BV=F32, O=BF,
                                LSE=F32)),
    "bwd_q": (K._bwd_q_kernel, dict(Q=BF, K=BF, V=BF, DO=BF, O=BF, POS=F32, GRP=I32, W=F32, WB=F32, BK=F32,
                                    BV=F32, LSE=F32, ROWS=F32, DQ=BF, GP=F32)),
    "bwd_kv": (K._bwd_kv_kernel, dict(Q=BF, K=BF, V=BF, DO=BF, POS=F32, GRP=I32, W=F32, WB=F32, ROWS=F32,
                                      DK=BF, DV=BF, GP=F32, GSUM=F32, GW=F32)),
}
DIV16 = {"sb", "sn", "sh", "ob", "on", "oh", "gb", "gn", "gh", "spb", "slb"}
INSTR = re.compile(r"\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def compile_kernel(fn, ptrs: dict, consts: dict, num_stages: int, maxnreg: int | None):
    """Compile one kernel for sm_90 (one warp, as the package launches them)."""
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "scale" else "i32")
           for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in set(ptrs) | DIV16
             if n in fn.arg_names}
    options = dict(num_warps=1, num_stages=num_stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def aff_small_sass(name: str, block_k: int, num_stages: int, maxnreg: int | None,
                   workdir: str) -> tuple[str, str]:
    """(SASS with source lines, resource usage) of kernel ``name`` (a key of ``KERNELS``)
    compiled for aff_small's shapes: m = 8, head dim 32, two clusters per program, bf16."""
    fn, ptrs = KERNELS[name]
    consts = dict(m=8, D=32, G=2, BLOCK_Q=16, BLOCK_K=block_k, BLOCK_D=32, DOT_T=tl.bfloat16,
                  DOT_PREC="tf32")
    ck = compile_kernel(fn, ptrs, consts, num_stages, maxnreg)
    return disassemble(ck.asm["cubin"], workdir, name)


def disassemble(cubin: bytes, workdir: str, name: str) -> tuple[str, str]:
    """(SASS with source lines, resource usage) of a cubin."""
    path = os.path.join(workdir, f"{name}.cubin")
    open(path, "wb").write(cubin)
    sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", "-g", path],
                          capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                           capture_output=True, text=True, check=True).stdout
    return sass, usage


def parse(sass: str) -> list[tuple[int, str, str, str]]:
    """(address, opcode, source 'file:line', text) per instruction."""
    out, src = [], "?"
    for line in sass.splitlines():
        m = re.match(r'\s*//## File ".*/([\w.]+)", line (\d+)', line)
        if m:
            src = f"{m.group(1)}:{m.group(2)}"
            continue
        m = INSTR.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), src, line))
    return out


def loops(sass: str, ins: list) -> list[tuple[int, int]]:
    """(first, last) address of each backward branch's range."""
    lines = sass.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^\.(L_x_\d+):", line)
        if m:
            nxt = next((INSTR.match(x) for x in lines[i + 1:] if INSTR.match(x)), None)
            if nxt:
                labels[m.group(1)] = int(nxt.group(1), 16)
    ranges = []
    for addr, _op, _src, text in ins:
        m = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", text)
        if m and labels.get(m.group(1), 1 << 30) < addr:
            ranges.append((labels[m.group(1)], addr))
    return ranges


def top(counter: collections.Counter, n: int) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="fwd,bwd_q,bwd_kv")
    ap.add_argument("--block-k", type=int, default=K.BLOCK_K)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--lines", action="store_true", help="main loop's instructions per source line")
    ap.add_argument("--dump", help="write each kernel's SASS to DIR/NAME.sass")
    args = ap.parse_args()
    source = open(K.__file__).read().splitlines()
    with tempfile.TemporaryDirectory() as work:
        for name in args.kernels.split(","):
            sass, usage = aff_small_sass(name, args.block_k, args.stages, args.maxnreg, work)
            if args.dump:
                open(os.path.join(args.dump, f"{name}.sass"), "w").write(sass)
            ins = parse(sass)
            regs = re.search(r"REG:(\d+)", usage)
            spills = sum(op in ("STL", "LDL") for _a, op, _s, _t in ins)
            print(f"{name}: {regs.group(1) if regs else '?'} registers, {spills} spill instructions, "
                  f"{len(ins)} instructions: {top(collections.Counter(op for _a, op, _s, _t in ins), 12)}")
            ranges = loops(sass, ins)
            for lo, hi in ranges:
                body = [i for i in ins if lo <= i[0] <= hi]
                print(f"  loop {lo:#06x}-{hi:#06x}: {len(body)} instructions: "
                      f"{top(collections.Counter(op for _a, op, _s, _t in body), 12)}")
            if args.lines and ranges:
                # the attention loop: the one with the most tensor-core instructions
                lo, hi = max(ranges, key=lambda r: sum(r[0] <= i[0] <= r[1] and i[1] == "HMMA" for i in ins))
                per = collections.defaultdict(collections.Counter)
                for addr, op, src, _t in ins:
                    if lo <= addr <= hi:
                        per[src][op] += 1
                for src, ops in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
                    file, _, ln = src.partition(":")
                    text = source[int(ln) - 1].strip()[:60] if file == "kernel.py" else ""
                    print(f"    {sum(ops.values()):4d}  {src:18s} {text:60s} {top(ops, 4)}")


if __name__ == "__main__":
    main()
