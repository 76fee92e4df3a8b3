"""Driver for Nsight Compute: the three cluster-attention kernels at one aff_small stage
(default 768 px stage 1, batch 16, bf16, structures prebuilt), forward + backward twice (the
first launch of each kernel compiles it; profile from the second, e.g. ``ncu -s 3 -c 3``).
Usage: ncu ... python scripts/device/ncu_attention.py [RES STAGE] [--dry]"""
import sys

import torch

from affmae.bench.attention import make_stage
from affmae.ops.cluster_attention import kernel

DRY = "--dry" in sys.argv
argv = [a for a in sys.argv[1:] if not a.startswith("--")]
res, stage = (int(argv[0]), int(argv[1])) if argv else (768, 1)
if DRY:
    res, stage = 64, 1
s = make_stage(res, stage - 1, 1 if DRY else 16, torch.float32 if DRY else torch.bfloat16,
               "cpu" if DRY else "cuda")
grp, grp_t = kernel.attention_groups(s["nbr"], s["m"]), kernel.attention_groups(s["nbr"], s["m"], True)
args = (s["q"], s["k"], s["v"], s["pos"], s["nbr"], s["n_valid"], *s["params"], s["D"] ** -0.5)
for _ in range(2):
    o, lse = kernel.attention_forward(*args, grp=grp)
    kernel.attention_backward(s["do"], *args[:3], o, lse, *args[3:], grp=grp, grp_t=grp_t)
if not DRY:
    torch.cuda.synchronize()
print(f"ran {res} px stage {stage}: N={s['N']} H={s['H']}")
