"""Compile the three cluster-attention kernels for sm_90 on this machine (no GPU needed: Triton's
bundled ptxas) and count SASS instructions, total and inside loops, by opcode class.
Usage: python scripts/sass_count.py [--dump DIR]"""
import collections
import re
import subprocess
import sys
import os

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from affmae.ops.cluster_attention import kernel as K

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def sig(fn, ptr_types, consts):
    s = {}
    for name in fn.arg_names:
        if name in consts:
            s[name] = "constexpr"
        elif name in ptr_types:
            s[name] = ptr_types[name]
        elif name == "scale":
            s[name] = "fp32"
        else:
            s[name] = "i32"
    return s


def compile_(fn, ptrs, consts, num_warps=1, num_stages=2):
    # Pointers and the token strides of aff_small's stage 1 are multiples of 16 (Triton
    # specialises on that at run time); the other ints are not assumed to be.
    div16 = set(ptrs) | {"sb", "sn", "sh", "ob", "on", "oh", "gb", "gn", "gh", "spb", "slb"}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16 if n in fn.arg_names}
    src = ASTSource(fn, sig(fn, ptrs, consts), constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def sass(ck, name, dump):
    path = f"/tmp/{name}.cubin"
    open(path, "wb").write(ck.asm["cubin"])
    out = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", "-g", path], capture_output=True, text=True).stdout
    open(f"/tmp/{name}.sass", "w").write(out)
    if dump:
        open(os.path.join(dump, f"{name}.sass"), "w").write(out)
    ins = [l for l in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    ops = collections.Counter()
    for l in ins:
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", l)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    return ins, ops


def main():
    dump = sys.argv[sys.argv.index("--dump") + 1] if "--dump" in sys.argv else None
    bf = "*bf16"
    c = dict(m=8, D=32, G=2, BLOCK_Q=16, BLOCK_K=32, BLOCK_D=32, DOT_T=tl.bfloat16, DOT_PREC="tf32")
    f32 = "*fp32"
    i32 = "*i32"
    kernels = {
        "fwd": (K._fwd_kernel, dict(Q=bf, K=bf, V=bf, POS=f32, GRP=i32, W=f32, WB=f32, BK=f32, BV=f32, O=bf, LSE=f32)),
        "bwd_q": (K._bwd_q_kernel, dict(Q=bf, K=bf, V=bf, DO=bf, O=bf, POS=f32, GRP=i32, W=f32, WB=f32, BK=f32,
                                        BV=f32, LSE=f32, ROWS=f32, DQ=bf, GP=f32)),
        "bwd_kv": (K._bwd_kv_kernel, dict(Q=bf, K=bf, V=bf, DO=bf, POS=f32, GRP=i32, W=f32, WB=f32, ROWS=f32,
                                          DK=bf, DV=bf, GP=f32, GSUM=f32)),
    }
    for name, (fn, ptrs) in kernels.items():
        ck = compile_(fn, ptrs, c)
        ins, ops = sass(ck, name, dump)
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(14))
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f"/tmp/{name}.cubin"],
                             capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", res)
        for st, en, cnt, lops in loops(f"/tmp/{name}.sass"):
            print(f"  loop {st:#x}-{en:#x}: {cnt} instructions: " + ", ".join(f"{k} {v}" for k, v in lops.most_common(24)))
        print(f"{name}: regs {regs.group(1) if regs else '?'} shared {ck.metadata.shared} "
              f"instructions {len(ins)}: {top}")


def loops(path):
    """(start, end, count, opcode counter) of each backward-branch range in a SASS dump."""
    lines = open(path).read().splitlines()
    addr = []
    for l in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(.*)", l)
        if m:
            addr.append((int(m.group(1), 16), m.group(2)))
    labels = {}
    for i, l in enumerate(lines):
        m = re.match(r"^\.(L_x_\d+):", l)
        if m:
            nxt = next((re.match(r"\s+/\*([0-9a-f]{4})\*/", x) for x in lines[i + 1:] if re.match(r"\s+/\*[0-9a-f]{4}\*/", x)), None)
            if nxt:
                labels[m.group(1)] = int(nxt.group(1), 16)
    out = []
    for a, txt in addr:
        m = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", txt)
        if m and labels.get(m.group(1), 1 << 30) < a:
            body = [t for x, t in addr if labels[m.group(1)] <= x <= a]
            ops = collections.Counter(re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_]+)", t).group(2) for t in body)
            out.append((labels[m.group(1)], a, len(body), ops))
    return out


if __name__ == "__main__":
    main()
