"""Weighted point gather: one functional entry point over a PyTorch reference and a Triton kernel.

The deformable decoder's interpolation (AFFMAE sec. 3.2, eq. 2; DESIGN 2.5):
out[b, q, h, p] = sum_k weights[b, q, h, p, k] * table[b, sel[b, q, h, p, k], h].

``gather_weighted(table, sel, weights, backend="auto" | "triton" | "torch")``. Both backends
share one signature and compute the same function (``reference.py`` is the specification).
"auto" uses Triton on CUDA tensors when it can and otherwise the reference; ``why_not_triton``
says why it refused, and "auto" warns with that reason when it falls back on CUDA tensors.
The environment variable ``AFFMAE_POINT_GATHER_BACKEND`` overrides "auto" for users, and
``AFFMAE_POINT_GATHER_DTABLE`` ("atomic", "sorted" or "window") picks how the Triton backward
forms d_table. Unset, it is "atomic" (float32 atomics: faster, not bitwise repeatable), or
"sorted" (sort + segment sums: deterministic) while ``torch.are_deterministic_algorithms_enabled()``.
"window" (not repeatable either) sums each program's contributions to a window of nearby table
rows with one float32 matmul first, so contended rows get fewer atomics; it stays opt-in: on
an H200 it was slower than "atomic" at the decoder's sizes (docs/BENCHMARKS.md, session 8).
If a user sets "atomic" or "window" under deterministic algorithms, "auto"
takes the reference ("triton" still runs it).

Files: ``reference.py`` (specification, CPU path), ``kernel.py`` (Triton kernels and launchers),
``function.py`` (custom ops with FLOP formulas, the autograd Function, ``gather_weighted_triton``).
"""

from __future__ import annotations

import os
import warnings

import torch

from affmae.ops.dispatch import package_kernels, triton_device
from affmae.ops.point_gather.reference import gather_weighted_ref

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "AFFMAE_POINT_GATHER_BACKEND"
DTABLE_ENV_VAR = "AFFMAE_POINT_GATHER_DTABLE"
DTABLE_MODES = ("atomic", "sorted", "window")


def dtable_mode() -> str:
    """The d_table mode: ``AFFMAE_POINT_GATHER_DTABLE`` if set, else "sorted" under
    deterministic algorithms and "atomic" otherwise (see the module docstring)."""
    default = "sorted" if torch.are_deterministic_algorithms_enabled() else "atomic"
    mode = os.environ.get(DTABLE_ENV_VAR, default)
    if mode not in DTABLE_MODES:
        raise ValueError(f"{DTABLE_ENV_VAR} must be one of {DTABLE_MODES}, got {mode!r}")
    return mode


def why_not_triton(table: torch.Tensor, sel: torch.Tensor) -> str | None:
    """Reason the Triton kernel cannot run on these inputs, or None when it can."""
    try:
        from affmae.ops.point_gather import kernel
    except ImportError as e:  # Triton missing
        return f"the Triton kernel is unavailable ({e})"
    if not triton_device(table):
        return f"inputs are on {table.device.type}, not CUDA (set TRITON_INTERPRET=1 to interpret on CPU)"
    return kernel.why_not(table, sel)


def resolve_backend(backend: str, table: torch.Tensor, sel: torch.Tensor) -> str:
    """Pick the backend for these inputs; 'auto' falls back to 'torch' when Triton can't run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not table.is_cuda or not package_kernels():
            return "torch"
        if torch.are_deterministic_algorithms_enabled() and dtable_mode() != "sorted":
            return "torch"  # documented above: atomic d_table is not bitwise repeatable
        reason = why_not_triton(table, sel)
        if reason:
            warnings.warn(f"gather_weighted: backend 'auto' uses 'torch' because {reason}", stacklevel=3)
            return "torch"
        return "triton"
    if backend == "triton":
        reason = why_not_triton(table, sel)
        if reason:
            raise RuntimeError(f"backend='triton' requested but {reason}")
    return backend


def gather_weighted(table: torch.Tensor, sel: torch.Tensor, weights: torch.Tensor,
                    backend: str = "auto") -> torch.Tensor:
    """sum_k weights[..., k] * table[b, sel[..., k], h] without materialising the gathered rows.

    Args:
        table: (B, Nk, H, F) per-head features. sel: (B, Nq, H, Pt, K) int slots in [0, Nk),
            or (B, Nq, H, 1, K) shared by the Pt weight sets of each row (fewer gathers and
            atomics in the kernels).
        weights: (B, Nq, H, Pt, K) interpolation weights (float32; they carry gradient).
        backend: "auto" | "triton" | "torch".
    Returns:
        (B, Nq, H, Pt, F) in table's dtype (float32 accumulation).
    """
    if resolve_backend(backend, table, sel) == "triton":
        from affmae.ops.point_gather.function import gather_weighted_triton

        return gather_weighted_triton(table, sel, weights, dtable_mode())
    return gather_weighted_ref(table, sel, weights)


__all__ = ["gather_weighted", "gather_weighted_ref", "resolve_backend", "why_not_triton"]
