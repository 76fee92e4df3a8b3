"""Autocast's weight casts for a whole forward in one kernel: ``casts_weights_once``.

Why: under autocast every ``Linear`` casts its float32 weight and bias to bf16 / fp16 at each
call, two small copy kernels per Linear. In a replayed aff_small training step (H200, bf16,
512 px) that was 278 ``bfloat16_copy`` kernels, 0.68 ms of a 23 ms step, nearly all of it launch
and tail time (the bytes, 22.6M parameters read once, take about 0.04 ms).

What: ``cast_weights(module)`` is a context manager. On entry, under autocast with gradients
enabled, it casts the weight and bias of every package ``Linear`` in ``module`` that would run
through the Triton-backed Function (``affmae.ops.linear``) to the autocast dtype with one
``torch._foreach_copy_`` (CUDA's multi-tensor kernel takes float32 sources into bf16 / fp16
destinations in a few launches). Inside the context ``linear_triton`` takes its operand from
there instead of casting; the values are the same bits (the same rounding of the same float32
numbers), so outputs are bitwise unchanged. Gradients still go to the float32 parameters: the
Function receives the parameter and its cast separately.

Each cast is its own allocation. Two designs with one flat buffer of views were slower or
bigger: packed end to end, most weights started at offsets that are not 16-byte multiples and
cuBLAS chose SM75 "align1" GEMMs (aff_small 22.9 -> 25.6 ms per step at 512 px on an H200);
512-byte aligned, the step took 20.4 ms, but the buffer lived until the last Linear's backward
(the first layer's), where per-call casts die one by one (a CPU count of live bytes: vit_small's
step peak at 128 px 94.8 -> 125.1 MiB).

Safety: a cast is used only while its parameter's ``_version`` is the one it was cast at, so a
parameter changed in place inside the context (an optimizer step, ``load_state_dict``) is cast
afresh at its next use. Contexts nest (an inner one on the same thread does nothing). The
casts are dropped on exit; activations saved for the backward keep what they need.
Recomputed forwards (gradient checkpointing) that run after the exit cast per call, as before.

``casts_weights_once`` decorates a model's top-level ``forward`` with this context (AFFMAE,
ViTMAE, Segmenter); ``no_weight_casts`` turns it off around a call.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

_local = threading.local()


def _active() -> dict | None:
    return getattr(_local, "casts", None)


def cached_cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The context's cast of parameter ``t`` to ``dtype``, or None (not cached, another dtype,
    or changed in place since it was cast)."""
    casts = _active()
    if not casts or t is None:
        return None
    hit = casts.get(t)
    if hit is None or hit[0].dtype != dtype or hit[1] != t._version:
        return None
    return hit[0]


def _linear_params(module: nn.Module) -> list[torch.Tensor]:
    """Weights and biases of the Linears whose calls take the Function (``_use_function``'s
    tests that do not depend on the input). The global tests run once, not per layer."""
    from affmae.ops.dispatch import package_kernels, plain_eager
    from affmae.ops.linear import Linear

    auto_ok = package_kernels() and plain_eager()  # environment, compiler, dispatch modes
    out = []
    for m in module.modules():
        if not isinstance(m, Linear) or m.bias is None:
            continue
        w, b = m.weight, m.bias
        if w.dtype != torch.float32 or b.dtype != torch.float32:
            continue
        if m.backend == "triton" or (m.backend == "auto" and auto_ok and w.is_cuda
                                     and b.requires_grad and plain_eager(w, b)):
            out += [w, b]
    return out


@contextlib.contextmanager
def cast_weights(module: nn.Module) -> Iterator[None]:
    """Cast the Function-path Linear parameters of ``module`` to the autocast dtype in one go
    for the duration of the context (see the module docstring)."""
    if _active() is not None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    params = [p for p in _linear_params(module)
              if torch.is_autocast_enabled(p.device.type)
              and torch.get_autocast_dtype(p.device.type) != torch.float32]
    if not params:
        yield
        return
    casts = {}
    by_key: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        by_key.setdefault((p.device, torch.get_autocast_dtype(p.device.type)), []).append(p)
    with torch.no_grad():
        for (device, dtype), group in by_key.items():
            # One allocation per cast (not views of one buffer): each is freed when the last
            # backward that saved it has run, as the per-call casts were, and each is aligned as
            # allocations are (see the module docstring for what views cost).
            out = [torch.empty(p.shape, dtype=dtype, device=device) for p in group]
            torch._foreach_copy_(out, [p.detach() for p in group])
            casts.update({p: (c, p._version) for p, c in zip(group, out)})
    _local.casts = casts
    try:
        yield
    finally:
        _local.casts = None


@contextlib.contextmanager
def no_weight_casts() -> Iterator[None]:
    """Inside it, ``cast_weights`` does nothing and every Linear casts at each call (for
    comparisons and debugging)."""
    saved = _active()
    _local.casts = {}
    try:
        yield
    finally:
        _local.casts = saved


def casts_weights_once(forward: Callable) -> Callable:
    """Decorator for a model's ``forward(self, ...)``: runs it inside ``cast_weights(self)``."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced: the compiler sees plain F.linear calls
            return forward(self, *args, **kwargs)
        with cast_weights(self):
            return forward(self, *args, **kwargs)

    return wrapper
