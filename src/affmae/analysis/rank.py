"""Normalised effective rank of a token set (paper 3.3, eq. 3; Roy & Vetterli, 2007).

    R = exp(-sum_i p_i log p_i) / min(N, D),   p_i = sigma_i / sum_j sigma_j,

sigma_i the singular values of the (N, D) feature matrix. R = 1 when all min(N, D) singular
values are equal (an orthogonal set), R = 1 / min(N, D) for rank-one data. A collapsed stage
(tokens that only carry their position embedding) shows a low R.

Deliberate choice (the paper is silent): features are NOT centred by default, matching eq. 3
applied to the raw token matrix. ``center=True`` subtracts the per-channel mean first, which
removes a shared offset direction (one large singular value that otherwise lowers R).
Computed in float64 on the features' device.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["effective_rank"]


def effective_rank(features: torch.Tensor | np.ndarray, center: bool = False) -> float:
    """Normalised effective rank (eq. 3) of an (N, D) feature matrix, in (0, 1].

    Args:
        features: (N, D) torch tensor (any device/dtype) or numpy array; for a stage's tokens
            (B, N, C) pass ``tokens.reshape(-1, C)``.
        center: subtract the per-column mean before the SVD (default False, see module doc).
    Raises:
        ValueError: not 2-D, empty, non-finite, or all-zero (no spectrum to normalise).
    """
    x = torch.as_tensor(features)
    if x.dim() != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or Inf")
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    sigma = torch.linalg.svdvals(x)  # (min(N, D),)
    total = sigma.sum()
    if not float(total) > 0.0:
        raise ValueError(
            f"features of shape {tuple(x.shape)} have no non-zero singular value"
            + (" after centring" if center else "")
        )
    p = sigma / total
    # 0 * log 0 = 0: xlogy handles the zero singular values of rank-deficient data.
    entropy = -torch.special.xlogy(p, p).sum()
    return float(torch.exp(entropy) / min(x.shape))
