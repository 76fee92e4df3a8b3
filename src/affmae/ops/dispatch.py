"""When a custom op's Python fast path may bypass the torch.library dispatcher.

The Triton ops register ``torch.library`` custom ops (so torch.compile, fake tensors and FLOP
counters see them), but in plain eager mode calling the kernels directly saves host time on
every launch. ``plain_eager`` says when nothing is watching the dispatcher.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET``, read by
    Triton when it is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


KERNELS_ENV = "AFFMAE_KERNELS"


def package_kernels() -> bool:
    """Whether "auto" choices may use the package's Triton kernels: False when the environment
    sets ``AFFMAE_KERNELS=torch``, which puts every op whose backend is "auto" on its PyTorch
    reference path (the same function; for cross-checking and debugging)."""
    mode = os.environ.get(KERNELS_ENV, "auto").lower()
    if mode not in ("auto", "torch"):
        raise ValueError(f"{KERNELS_ENV} must be 'auto' or 'torch', got {mode!r}")
    return mode == "auto"


def triton_device(t: Tensor) -> bool:
    """Whether a Triton kernel can take tensors on ``t``'s device: CUDA, or CPU when
    interpreting."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter is a subclass that changes nothing here


def plain_eager(*tensors: Tensor) -> bool:
    """True when no compiler, dispatch mode (e.g. FlopCounterMode), functorch transform or
    tensor subclass needs to see the custom op."""
    return (
        not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        and not torch._C._are_functorch_transforms_active()
        and all(type(t) in _PLAIN for t in tensors)
    )
