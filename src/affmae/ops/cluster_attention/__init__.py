"""Cluster attention: one functional entry point over a PyTorch reference and a Triton kernel.

``cluster_attention(..., backend="auto" | "triton" | "torch")``. Both backends share one signature
and compute the same function (see ``reference.py`` for the specification). "auto" uses Triton on
CUDA tensors when it can and otherwise the reference; ``why_not_triton`` says why it refused, and
"auto" warns with that reason when it falls back on CUDA tensors. ``cluster_attention_packed``
takes q, k, v packed as one (B, N, 3, H, D) tensor (a fused projection's output): the same
function, and on Triton the backward returns that tensor's gradient packed (no stack of three).
The environment variable ``AFFMAE_ATTENTION_BACKEND`` overrides "auto" for users.

Files: ``reference.py`` (specification, CPU path), ``kernel.py`` (Triton kernels and launchers),
``function.py`` (custom ops with FLOP formulas, the autograd Function, ``cluster_attention_triton``).
"""

from __future__ import annotations

import os
import warnings

import torch

from affmae.ops.dispatch import package_kernels, triton_device
from affmae.ops.cluster_attention.reference import cluster_attention_ref

BACKENDS = ("auto", "triton", "torch")


def why_not_triton(q: torch.Tensor) -> str | None:
    """Reason the Triton kernel cannot run on these inputs, or None when it can."""
    try:
        from affmae.ops.cluster_attention import kernel  # noqa: F401
    except ImportError as e:  # Triton missing or the kernel module absent
        return f"the Triton kernel is unavailable ({e})"
    if not triton_device(q):
        return f"inputs are on {q.device.type}, not CUDA (set TRITON_INTERPRET=1 to interpret on CPU)"
    return kernel.why_not(q)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """Pick the backend for these inputs; 'auto' falls back to 'torch' when Triton can't run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("AFFMAE_ATTENTION_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"AFFMAE_ATTENTION_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not q.is_cuda or not package_kernels():
            return "torch"
        reason = why_not_triton(q)
        if reason:
            warnings.warn(f"cluster_attention: backend 'auto' uses 'torch' because {reason}", stacklevel=3)
            return "torch"
        return "triton"
    if backend == "triton":
        reason = why_not_triton(q)
        if reason:
            raise RuntimeError(f"backend='triton' requested but {reason}")
    return backend


def cluster_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    nbr: torch.Tensor,
    n_valid: int,
    bias_weight: torch.Tensor,
    bias_bias: torch.Tensor,
    blank_k: torch.Tensor,
    blank_v: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    groups: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Cluster attention with relative-position bias and a blank key/value.

    Args:
        q, k, v: (B, N, H, D) clustered tokens, N = M * m; slots >= n_valid are padding, which
            must be finite (``pad_tokens`` repeats the last token): the Triton kernels
            gather padded rows and give them zero weight, and 0 * NaN is NaN.
        pos: (B, N, 2) float positions. nbr: (B, M, Kc) neighbour clusters of each cluster.
        n_valid: real token count. bias_weight: (H, 5), bias_bias: (H,). blank_k, blank_v: (H, D).
        scale: logit scale (default D ** -0.5). backend: "auto" | "triton" | "torch".
        groups: optional, the Triton kernels' group structures of ``nbr`` (forward, key-major;
            ``Clustering.attention_groups``: built once per stage instead of once per block);
            the reference ignores them.
    Returns:
        (B, N, H, D) in the dtype of q.
    """
    chosen = resolve_backend(backend, q)
    if chosen == "triton":
        from affmae.ops.cluster_attention.function import cluster_attention_triton

        return cluster_attention_triton(
            q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
            groups=groups,
        )
    return cluster_attention_ref(
        q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale
    )


def cluster_attention_packed(
    qkv: torch.Tensor, pos: torch.Tensor, nbr: torch.Tensor, n_valid: int,
    bias_weight: torch.Tensor, bias_bias: torch.Tensor, blank_k: torch.Tensor,
    blank_v: torch.Tensor, scale: float | None = None, backend: str = "auto",
    groups: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``cluster_attention`` of q, k, v = ``qkv.unbind(2)``, for a packed (B, N, 3, H, D) ``qkv``.

    Same output and gradients. Unbinding before the call makes autograd stack the three token
    gradients into qkv's (one copy kernel per layer); the Triton backward instead writes them
    into one packed gradient. The reference unbinds (its autograd forms qkv's gradient anyway).
    Other arguments and the result as ``cluster_attention``.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D), got shape {tuple(qkv.shape)}")
    chosen = resolve_backend(backend, qkv[:, :, 0])
    if chosen == "triton":
        from affmae.ops.cluster_attention.function import cluster_attention_triton_packed

        return cluster_attention_triton_packed(
            qkv, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale, groups=groups,
        )
    return cluster_attention_ref(
        *qkv.unbind(2), pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale
    )


__all__ = ["cluster_attention", "cluster_attention_packed", "cluster_attention_ref", "resolve_backend",
           "why_not_triton"]
