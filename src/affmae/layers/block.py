"""AFF transformer block: pre-norm cluster attention and MLP, each a residual branch."""

from __future__ import annotations

import torch
from torch import nn

from affmae.layers.attention import ClusterAttention
from affmae.layers.common import DropPath, Mlp
from affmae.ops.clustering import Clustering
from affmae.ops.layer_norm import FusedLayerNorm


class AFFBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0,
                 backend: str = "auto", norm_backend: str = "auto") -> None:
        super().__init__()
        self.norm1 = FusedLayerNorm(dim, backend=norm_backend)
        self.attn = ClusterAttention(dim, heads, backend=backend)
        self.norm2 = FusedLayerNorm(dim, backend=norm_backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cl: Clustering,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop``: (2, B) drop-path factors of the two branches (``StochasticDepth``), or None
        (the block's DropPath draws them)."""
        f_attn, f_mlp = (None, None) if drop is None else drop
        x, h = self.norm2.residual(x, self.attn(self.norm1(x), pos, cl), self.drop_path, f_attn)
        return self.drop_path.residual_add(x, self.mlp(h), f_mlp)
