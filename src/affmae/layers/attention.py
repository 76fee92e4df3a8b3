"""Cluster attention module (AFF sec. 3.2; DESIGN 3).

Multi-head attention of each cluster's m queries over the tokens of its Kc neighbour clusters,
plus a learned blank key/value per head (so a query may attend to nothing), with a
relative-position bias Linear(5 -> H) of (dx, dy, r, dx/r, dy/r). The op itself lives in
``affmae.ops.cluster_attention`` (PyTorch reference or Triton kernel, same function).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from affmae.ops.cluster_attention import cluster_attention_packed, resolve_backend
from affmae.ops.clustering import Clustering
from affmae.ops.linear import Linear
from affmae.ops.relpos import NUM_RELPOS_FEATURES


class ClusterAttention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str = "auto") -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.backend = backend
        self.qkv = Linear(dim, 3 * dim)
        self.rel_bias = nn.Linear(NUM_RELPOS_FEATURES, heads)
        self.blank_k = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.blank_v = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.proj = Linear(dim, dim)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.rel_bias.weight)
        nn.init.zeros_(self.rel_bias.bias)
        nn.init.trunc_normal_(self.blank_k, std=0.02)
        nn.init.trunc_normal_(self.blank_v, std=0.02)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cl: Clustering) -> torch.Tensor:
        """x: (B, M*m, C) clustered tokens, pos: (B, M*m, 2) -> (B, M*m, C)."""
        B, N, C = x.shape
        # Packed, not unbound: the Triton backward then writes q, k, v's gradients into one
        # (B, N, 3, H, D) tensor, where autograd would otherwise stack three (one copy a layer).
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim)  # (B, N, 3, H, D)
        with record_function("aff/attention"):
            backend = resolve_backend(self.backend, qkv[:, :, 0])
            # The Triton kernels walk group structures of the neighbourhood (the key-major one
            # only for the backward); the blocks of a stage share one clustering, so they are
            # built once per stage (cached on ``cl``). Not while torch.compile traces a block:
            # the custom ops then build their own.
            groups = None
            if backend == "triton" and not torch.compiler.is_compiling():
                groups = cl.attention_groups(torch.is_grad_enabled() and qkv.requires_grad)
            out = cluster_attention_packed(
                qkv, pos, cl.nbr, cl.n_valid,
                self.rel_bias.weight, self.rel_bias.bias,
                self.blank_k, self.blank_v,  # float32: both backends read them in float32
                backend=backend, groups=groups,
            )  # (B, N, H, D)
        return self.proj(out.reshape(B, N, C))
