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

    @property
    def input_norm(self) -> FusedLayerNorm:
        """The norm of the block's input (``run_chained`` fuses it into the previous block)."""
        return self.norm1

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cl: Clustering,
                drop: torch.Tensor | None = None, h: torch.Tensor | None = None,
                next_norm: FusedLayerNorm | None = None):
        """``drop``: (2, B) drop-path factors of the two branches (``StochasticDepth``), or None
        (the block's DropPath draws them). ``h``: ``norm1(x)`` when the caller has it.
        ``next_norm``: the next block's input norm, fused with this block's last residual
        step; the block then returns ``(x, next_norm(x))`` instead of x (``run_chained``)."""
        f_attn, f_mlp = (None, None) if drop is None else drop
        h = self.norm1(x) if h is None else h
        x, h = self.norm2.residual(x, self.attn(h, pos, cl), self.drop_path, f_attn)
        if next_norm is not None:
            return next_norm.residual(x, self.mlp(h), self.drop_path, f_mlp)
        return self.drop_path.residual_add(x, self.mlp(h), f_mlp)
