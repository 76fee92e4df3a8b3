"""Device names from the command line -> torch devices, with one clear error."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N'; CUDA without a GPU is an
    error naming the request, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def backward_on_calling_thread():
    """Context manager: autograd runs the backward of CUDA tensors on the thread that calls
    ``backward()`` / ``autograd.grad``, not on its per-device worker thread.

    By default PyTorch hands a CUDA backward to a worker thread and blocks the caller until it
    ends. Every handoff wakes that thread, often on another core, and the Python backward of a
    custom autograd Function (this package's kernels) then runs there with cold caches. On an
    H100 host one cluster-attention forward + backward (aff_small, 512 px, batch 16) took
    0.48-0.58 ms of host time with the worker thread and 0.33-0.35 ms on the calling thread,
    with bitwise the same gradients (docs/BENCHMARKS.md, session 16). A training step calls
    ``backward()`` once, so it pays that handoff once: its eager aff_small step measured the
    same either way (110-150 ms, session 17). With one device per
    process, as in every run of this package (DDP starts a process per GPU), the worker thread
    buys nothing; PyTorch itself plans to make this the default. Thread-local; a no-op for CPU
    tensors, whose backward already runs on the calling thread."""
    return torch.autograd.set_multithreading_enabled(False)
