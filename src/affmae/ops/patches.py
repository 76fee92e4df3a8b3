"""Patch grids: images <-> raster-ordered patch vectors, raster index -> (x, y) position.

Raster order: patch index = row * gw + col; positions are (x, y) = (col, row) in patch units.
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, gh*gw, C*P*P) patches in raster order."""
    B, C, H, W = imgs.shape
    P = patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {P}")
    x = imgs.reshape(B, C, H // P, P, W // P, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // P) * (W // P), C * P * P)


def unpatchify(patches: torch.Tensor, grid_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(B, gh*gw, C*P*P) -> (B, C, gh*P, gw*P)."""
    B, _, D = patches.shape
    gh, gw = grid_hw
    P = patch_size
    C = D // (P * P)
    x = patches.reshape(B, gh, gw, C, P, P).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, gh * P, gw * P)


def grid_positions(idx: torch.Tensor, gw: int) -> torch.Tensor:
    """Raster patch indices (B, N) -> (B, N, 2) float (x, y) positions."""
    return torch.stack([idx % gw, torch.div(idx, gw, rounding_mode="floor")], dim=-1).float()
