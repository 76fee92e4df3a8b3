"""Indices of the k smallest values of each row: the neighbour searches' selection step.

``smallest_k(d, k)``: (..., N) -> (..., k) int64, ascending by value, ties broken by the lower
index (so the CPU and the CUDA path select the same neighbours even when distances tie, which on
a patch grid they often do).

- CUDA, N <= 1024 and k <= 32: a Triton kernel, k rounds of a row-wise argmin in registers.
  ``torch.topk`` gives every short row its own block; the decoder's five neighbour tables
  (65k rows of 96 candidates each at 512 px, batch 16) took 2.6 of 41 ms of an aff_small step.
- CPU, N <= 1024: a stable ``torch.sort`` (the reference; same tie rule).
- N > 1024 (cluster searches above about 1024 px), any device: ``torch.topk``, whose order
  among equal values is the backend's own (ties may then select differently on CPU and CUDA);
  a sort of such rows would cost O(N log N) per row.
"""

from __future__ import annotations

import torch

from affmae.ops.dispatch import package_kernels, triton_device

MAX_N, MAX_K = 1024, 32


def smallest_k_ref(d: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: stable sort, first k (ties -> lower index first)."""
    return torch.sort(d, dim=-1, stable=True).indices[..., :k]


def kernel_ok(t: torch.Tensor, n: int, k: int) -> bool:
    """Whether the selection kernels (``smallest_k``, ``nearest_clusters``' fused search) can
    take rows of ``n`` candidates and ``k`` picks on ``t``'s device."""
    if not triton_device(t) or not package_kernels():
        return False
    if n > MAX_N or k > MAX_K or t.numel() == 0:
        return False
    try:
        from affmae.ops import _smallest_k_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def smallest_k(d: torch.Tensor, k: int) -> torch.Tensor:
    """(..., N) float -> (..., min(k, N)) int64 indices of the smallest values (see module)."""
    k = min(k, d.shape[-1])
    if d.shape[-1] > MAX_N:
        return torch.topk(d, k, dim=-1, largest=False, sorted=True).indices
    if not kernel_ok(d, d.shape[-1], k):
        return smallest_k_ref(d, k)
    from affmae.ops._smallest_k_kernel import smallest_k_triton

    return smallest_k_triton(d, k)
