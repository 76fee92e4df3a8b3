"""Linear whose backward sums the bias gradient with a bandwidth-efficient Triton kernel.

Why: in a GPU profile of one training step (H200, bf16 autocast, batch 16) torch's bias-gradient
reduction inside ``AddmmBackward0`` (``grad.sum(0)`` over (M, N), M = 5k-65k rows, N = 72-1536)
ran at only about 0.5 TB/s: 44 us for a (32768, 384) bf16 gradient that needs about 8 us at HBM
speed, 3.1 ms of a 28 ms step in all.

What: ``Linear`` (``nn.Linear``: same parameters, state dict and forward) and the functional
``linear`` compute y = x @ W^T + b with the same matrix products as ``F.linear``, in the same
dtypes (autocast's casts done inside the autograd Function), so the output, dx and dW are
bitwise F.linear's (except on CUDA under autocast, where a float32 weight's or input's gradient
comes out of the GEMM in float32 instead of being rounded to bf16 / fp16 and cast: more
accurate, see ``function``); the bias gradient is a deterministic Triton column sum accumulated
in float32 (``kernel.colsum``), cast once to the bias dtype. Under autocast that is at least as
accurate as torch, which rounds the sum to bf16 / fp16 first. One difference: autocast caches
its cast of a weight used twice in one autocast region, this casts it at every call.

When: ``backend`` "torch" is always ``F.linear``. "triton" is the Function on CUDA, or on CPU
under TRITON_INTERPRET=1 (for tests), and raises otherwise. "auto" (the default) is the Function
only where it changes something and nothing else needs to see the aten op: on CUDA, in grad mode
with a bias that requires a gradient, a 2-D or contiguous input of float32 / bf16 / fp16 (after
autocast), AFFMAE_KERNELS not "torch", and no ``torch.compile`` trace, dispatch mode (e.g.
FlopCounterMode), functorch transform or tensor subclass watching, so that compilers and FLOP
counters see the plain aten linear. Everywhere else "auto" is F.linear. ``why_not_triton`` names
the reason the Function cannot run.

Measured on an H200 (scripts/device/colsum_bench.py, bf16, L2 flushed, GPU time of CUDA-graph
replays): the column sum of a (32768, 384) gradient takes 19 us against torch's 46 (1.3 against
0.55 TB/s), 2.4-3.3x faster for N = 192-456 and M >= 13k, 1.1-1.4x for N >= 1152 or M <= 5k; one
forward + backward under autocast, (32768, 384) -> 384: 195 against 233 us. In eager mode the
Function's Python forward and backward cost the host about 2x nn.Linear's launch time (590
against 270 us per forward + backward on that machine's CPU), so the gain needs a training step
that is GPU-bound or graph-captured.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from affmae.ops.dispatch import package_kernels, plain_eager, triton_device

BACKENDS = ("auto", "triton", "torch")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"linear backend must be one of {BACKENDS}, got {backend!r}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


def why_not_triton(x: torch.Tensor) -> str | None:
    """Why the Triton-backed Function cannot take ``x``, or None when it can."""
    if not triton_device(x):
        return (f"x is on {x.device.type}, not CUDA (set TRITON_INTERPRET=1 to interpret the "
                f"kernel on CPU)")
    dtype = _compute_dtype(x)
    if dtype not in _DTYPES:
        return f"the column-sum kernel takes float32, bfloat16 or float16, not {dtype}"
    try:
        importlib.import_module("affmae.ops.linear.function")  # imports Triton
    except ImportError as e:
        return f"the Triton kernel is unavailable ({e})"
    return None


def _plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return plain_eager(x, weight) if bias is None else plain_eager(x, weight, bias)


def _use_function(backend: str, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        reason = why_not_triton(x)
        if reason:
            raise RuntimeError(f"linear backend 'triton' cannot run: {reason}")
        return True
    # "auto": see the module docstring. Without a bias gradient the Function would change
    # nothing; F.linear folds a non-contiguous input of 3+ dims differently (matmul + add), so
    # such inputs stay there to keep the results bitwise equal.
    return (x.is_cuda and bias is not None and bias.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and package_kernels()
            and _plain(x, weight, bias) and (x.dim() == 2 or x.is_contiguous())
            and why_not_triton(x) is None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the Triton bias gradient where ``backend`` allows (see
    the module docstring)."""
    _check_backend(backend)
    if not _use_function(backend, x, weight, bias):
        return F.linear(x, weight, bias)
    from affmae.ops.linear.function import linear_triton

    return linear_triton(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose backward sums the bias gradient with
    the Triton column-sum kernel; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, backend: str = "auto") -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _check_backend(backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"
