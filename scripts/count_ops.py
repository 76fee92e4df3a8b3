"""Aten ops dispatched by one aff_small / vit_small forward+backward (bf16 autocast), on CPU.

With TRITON_INTERPRET=1 and AFFMAE_POINT_GATHER_BACKEND=triton the AFF model takes its GPU paths
(the Triton custom ops count as one op each), so the count is what a CUDA step dispatches: each
op is host time in an eager step and, unless it is a view, a kernel. Op counts do not depend on
the image size.

    TRITON_INTERPRET=1 AFFMAE_POINT_GATHER_BACKEND=triton python scripts/count_ops.py
"""

import collections
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from affmae import create_model
from affmae.ops.masking import make_mask


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


triton = os.environ.get("TRITON_INTERPRET") == "1"
for name, kw in (("aff_small", {"attention_backend": "triton" if triton else "torch"}),
                 ("vit_small", {})):
    torch.manual_seed(0)
    model = create_model(name, drop_path=0.0, **kw)
    imgs = torch.randn(1, 1, 64, 64)
    mask = make_mask(1, (8, 8), 0.5, "perlin", generator=torch.Generator().manual_seed(0))
    count = Count()
    with count:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs, mask, num_masked=32)["loss"]
        loss.backward()
    print(f"{name}: {sum(count.ops.values())} ops forward + backward")
    print("  " + ", ".join(f"{k} {v}" for k, v in count.ops.most_common(12)))
