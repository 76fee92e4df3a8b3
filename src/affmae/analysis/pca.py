"""First three principal components of a feature map as RGB (paper 3.3, Fig. 4).

The features of every position (of every image given) are pooled, centred, and projected on
the three leading eigenvectors of their covariance; each component becomes one colour channel.

Deliberate choices the paper leaves open:
    * One PCA per call, fitted jointly over all images passed, so a colour means the same
      direction in feature space in every image of a figure column (not one PCA per image).
    * Each component is mapped to [0, 1] by its 1st and 99th percentile over all positions
      (robust to a few outliers), then clipped.
    * A component whose variance is below ``rel_eps`` times the total variance (or all of them,
      when every feature vector is the same) is drawn as a constant 0.5: stretching round-off
      noise to full contrast would paint structure into a collapsed representation, the very
      thing Fig. 4 is meant to reveal.
    * Eigenvector signs are fixed (largest-magnitude loading positive), so the same features give
      the same colours.
Computed in float64 on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pca_rgb"]


def pca_rgb(
    features: torch.Tensor | np.ndarray, rel_eps: float = 1e-9
) -> tuple[np.ndarray, np.ndarray]:
    """Map (..., C) features to (..., 3) RGB in [0, 1] by their first three principal components.

    Args:
        features: (..., C) tensor or array, e.g. (n, gh, gw, C) decoder features on the grid.
        rel_eps: components with variance <= rel_eps * total variance are drawn as 0.5.
    Returns:
        (rgb, explained): rgb float64 (..., 3); explained (3,) float64 fraction of the total
        variance carried by each component (0 for missing or degenerate components).
    Raises:
        ValueError: fewer than 1 channel or 2 positions, or non-finite values.
    """
    x = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if x.dim() < 2 or x.shape[-1] < 1:
        raise ValueError(f"features must be (..., C) with C >= 1, got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    flat = x.reshape(-1, x.shape[-1])  # (M, C)
    if flat.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a PCA, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("features contain NaN or Inf")

    # 1. Covariance and its leading eigenvectors (eigh: ascending, so take the last three).
    flat = flat - flat.mean(dim=0, keepdim=True)
    cov = flat.T @ flat / flat.shape[0]  # (C, C)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.flip(0).clamp_min(0.0)
    evecs = evecs.flip(1)
    k = min(3, evecs.shape[1])
    total = float(evals.sum())
    rgb = np.full((flat.shape[0], 3), 0.5, dtype=np.float64)
    explained = np.zeros(3, dtype=np.float64)

    for c in range(k):
        if total <= 0.0 or float(evals[c]) <= rel_eps * total:
            continue  # degenerate: keep the constant 0.5 channel
        v = evecs[:, c]
        v = v * torch.sign(v[v.abs().argmax()])  # 2. deterministic sign
        proj = (flat @ v).numpy()  # (M,)
        # 3. Robust range; a component with tiny spread at the percentiles stays flat.
        lo, hi = np.percentile(proj, [1.0, 99.0])
        if not hi - lo > 1e-12 * max(1.0, abs(hi), abs(lo)):
            lo, hi = float(proj.min()), float(proj.max())
            if not hi > lo:
                continue
        rgb[:, c] = np.clip((proj - lo) / (hi - lo), 0.0, 1.0)
        explained[c] = float(evals[c]) / total
    return rgb.reshape(*lead, 3), explained
