"""Relative-position features of two point sets (AFF, Ziwen et al. 2023, sec. 3.3).

For a query at p_q and a key at p_k the features are (dx, dy, r, dx / r, dy / r) with
(dx, dy) = p_k - p_q and r = |(dx, dy)|; the two unit-vector components are defined as 0 at r = 0.
Positions are in stage-1 patch units, so the features need no table and cap no image size.
"""

from __future__ import annotations

import torch

NUM_RELPOS_FEATURES = 5


def relpos_features(delta: torch.Tensor) -> torch.Tensor:
    """(..., 2) offsets (key - query) -> (..., 5) features (dx, dy, r, dx/r, dy/r), float32
    or wider."""
    delta = delta.to(torch.promote_types(delta.dtype, torch.float32))
    r = torch.linalg.vector_norm(delta, dim=-1, keepdim=True)  # (..., 1)
    unit = torch.where(r > 0, delta / r.clamp_min(1e-12), torch.zeros_like(delta))
    return torch.cat([delta, r, unit], dim=-1)
