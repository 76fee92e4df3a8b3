"""Aten ops dispatched by one aff_small / vit_small forward+backward (bf16 autocast), on CPU.

With TRITON_INTERPRET=1 and AFFMAE_POINT_GATHER_BACKEND=triton the AFF model takes its GPU paths
(the Triton custom ops count as one op each), so the count is what a CUDA step dispatches: each
op is host time in an eager step and, unless it is a view, a kernel. Op counts do not depend on
the image size. Linear and layer norm take their CPU paths here (``F.linear`` with per-call
casts, ``native_layer_norm``), so their ops are not what CUDA runs.

    TRITON_INTERPRET=1 AFFMAE_POINT_GATHER_BACKEND=triton python scripts/count_ops.py
    ... python scripts/count_ops.py --owners [--model aff_small] [--top 30]

``--owners`` groups the ops that are not views by where they ran: ``fwd:<innermost module
class>`` in the forward, ``bwd:<autograd node>`` in the backward (session 10 found the
decoder's glue and the per-block stochastic-depth draws this way).
"""

import argparse
import collections
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from affmae import create_model
from affmae.ops.masking import make_mask

# ops that launch no kernel (views, allocation, profiler ranges)
NO_KERNEL = {"view", "t", "detach", "slice", "unsqueeze", "expand", "reshape", "permute",
             "transpose", "split", "split_with_sizes", "alias", "select", "_unsafe_view",
             "as_strided", "squeeze", "unbind", "narrow", "_record_function_enter_new",
             "_record_function_exit", "empty", "new_empty", "new_empty_strided", "empty_strided",
             "set_", "empty_like", "sym_size", "promote_types", "scalar_tensor"}


class Count(TorchDispatchMode):
    def __init__(self, stack: list[str] | None = None) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.owners: collections.Counter = collections.Counter()
        self.stack = stack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if self.stack is not None and name.split(".")[-1] not in NO_KERNEL:
            node = torch._C._current_autograd_node()
            where = f"bwd:{type(node).__name__}" if node is not None else f"fwd:{self.stack[-1]}"
            self.owners[(where, name.split(".")[-1])] += 1
        return func(*args, **(kwargs or {}))


def track_modules(model: torch.nn.Module) -> list[str]:
    """A stack of the innermost running module's class name, kept by forward hooks."""
    stack = ["top"]
    for mod in model.modules():
        mod.register_forward_pre_hook(lambda m, a: stack.append(type(m).__name__) and None)
        mod.register_forward_hook(lambda m, a, o: stack.pop() and None)
    return stack


p = argparse.ArgumentParser()
p.add_argument("--owners", action="store_true", help="group kernel-launching ops by owner")
p.add_argument("--model", nargs="+", default=["aff_small", "vit_small"])
p.add_argument("--top", type=int, default=30)
a = p.parse_args()
triton = os.environ.get("TRITON_INTERPRET") == "1"
for name in a.model:
    kw = {"attention_backend": "triton" if triton else "torch"} if name.startswith("aff") else {}
    torch.manual_seed(0)
    model = create_model(name, **kw)
    imgs = torch.randn(1, 1, 64, 64)
    mask = make_mask(1, (8, 8), 0.5, "perlin", generator=torch.Generator().manual_seed(0))
    count = Count(track_modules(model) if a.owners else None)
    with count:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs, mask, num_masked=32)["loss"]
        loss.backward()
    print(f"{name}: {sum(count.ops.values())} ops forward + backward")
    print("  " + ", ".join(f"{k} {v}" for k, v in count.ops.most_common(12)))
    if a.owners:
        per = collections.defaultdict(collections.Counter)
        for (where, op), n in count.owners.items():
            per[where][op] += n
        print(f"  kernel-launching ops by owner ({sum(count.owners.values())}):")
        for where, ops in sorted(per.items(), key=lambda kv: -sum(kv[1].values()))[:a.top]:
            print(f"  {sum(ops.values()):5d} {where:34s} " +
                  ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))
