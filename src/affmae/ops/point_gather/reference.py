"""Weighted point gather, PyTorch reference: the specification of the op and its CPU path.

The deformable decoder's interpolation step (AFFMAE sec. 3.2, eq. 2; DESIGN 2.5): each sampling
point (b, q, h, p) mixes K selected rows of a per-head table with its interpolation weights,

    out[b, q, h, p, :] = sum_k weights[b, q, h, p, k] * table[b, sel[b, q, h, p, k], h, :]

Computed with ``F.embedding_bag`` over the flattened table, so the (..., K, F) gathered rows are
never materialised. Accumulation is float32 (float64 for float64 tables): CUDA has no
half-precision backward for ``per_sample_weights``, and the sum is more accurate. Output in the
table's dtype. Gradients reach table and weights; ``sel`` is an index (no gradient).
Deviation from the first version (``interpolate.gather_weighted`` before the kernel): a float64
table now stays float64 instead of passing through float32 (the tests' exact evaluation needs it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_weighted_ref(table: torch.Tensor, sel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[..., k] * table[b, sel[..., k], h] (see the module docstring).

    Args:
        table: (B, Nk, H, F) per-head features. sel: (B, Nq, H, Pt, K) integer slots in [0, Nk),
            or (B, Nq, H, 1, K) shared by the Pt weight sets of each row.
        weights: (B, Nq, H, Pt, K) interpolation weights (float32 in the model).
    Returns:
        (B, Nq, H, Pt, F) in table's dtype.
    """
    sel = sel.expand(weights.shape)
    B, Nk, H, Fd = table.shape
    Nq, Pt, K = sel.shape[1], sel.shape[3], sel.shape[4]
    acc = torch.promote_types(table.dtype, torch.float32)
    b = torch.arange(B, device=sel.device).view(B, 1, 1, 1, 1)
    h = torch.arange(H, device=sel.device).view(1, 1, H, 1, 1)
    flat = ((b * Nk + sel.long()) * H + h).reshape(-1, K)  # (B*Nq*H*Pt, K) rows of the flat table
    out = F.embedding_bag(flat, table.reshape(B * Nk * H, Fd).to(acc), mode="sum",
                          per_sample_weights=weights.reshape(-1, K).to(acc))
    return out.view(B, Nq, H, Pt, Fd).to(table.dtype)  # (B, Nq, H, Pt, F)
