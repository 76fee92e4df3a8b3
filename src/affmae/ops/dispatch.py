"""When a custom op's Python fast path may bypass the torch.library dispatcher.

The Triton ops register ``torch.library`` custom ops (so torch.compile, fake tensors and FLOP
counters see them), but in plain eager mode calling the kernels directly saves host time on
every launch. ``plain_eager`` says when nothing is watching the dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


def plain_eager(*tensors: Tensor) -> bool:
    """True when no compiler, dispatch mode (e.g. FlopCounterMode), functorch transform or
    tensor subclass needs to see the custom op."""
    return (
        not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        and not torch._C._are_functorch_transforms_active()
        and all(type(t) is torch.Tensor for t in tensors)
    )
