"""Run a module with the cluster-attention kernels' register caps set (``kernel.MAXNREG``), and
optionally their pipelining stages (``kernel.NUM_STAGES``: items ``stages.KERNEL=N``).

Usage: python scripts/device/with_maxnreg.py q=168,kv=168[,stages.fwd=3] -m MODULE [ARGS...]
(e.g. ``-m pytest -m gpu tests/ops/test_cluster_attention_triton.py`` or
``-m affmae.bench.attention --impl triton``). A cap of 0 removes that kernel's cap; ``none`` as
the first argument removes every cap (the compiler's choice), ``default`` keeps the package's."""
import runpy
import sys

from affmae.ops.cluster_attention import kernel

caps, flag, module, *rest = sys.argv[1:]
if flag != "-m":
    sys.exit(__doc__)
if caps == "none":
    kernel.MAXNREG.update(dict.fromkeys(kernel.MAXNREG))
elif caps != "default":
    for item in caps.split(","):
        name, n = item.split("=")
        if name.startswith("stages."):
            if name[7:] not in kernel.NUM_STAGES:
                sys.exit(f"unknown kernel {name[7:]!r}: one of {sorted(kernel.NUM_STAGES)}")
            kernel.NUM_STAGES[name[7:]] = int(n)
            continue
        if name not in kernel.MAXNREG:
            sys.exit(f"unknown kernel {name!r}: one of {sorted(kernel.MAXNREG)}")
        kernel.MAXNREG[name] = int(n) or None
print(f"# kernel.MAXNREG = {kernel.MAXNREG}, kernel.NUM_STAGES = {kernel.NUM_STAGES}", flush=True)
sys.argv = [module, *rest]
runpy.run_module(module, run_name="__main__", alter_sys=True)
