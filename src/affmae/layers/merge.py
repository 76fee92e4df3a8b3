"""Adaptive downsampling: importance top-k and point-based neighbourhood merging (AFF sec. 3.4;
DESIGN 2.4d).

1. importance = sigmoid(Linear(C, 1)(x)) per token.
2. keep the k = max(1, floor(N * d_s)) most important real tokens (any d_s in (0, 1]); kept tokens
   keep their positions and their clustered order.
3. each kept token merges its neighbourhood (the Kc*m tokens of its cluster's neighbour clusters):
   w = GELU(LN(Linear(5 -> 4)(relpos))) * importance_neighbour; the importance factor is the
   score's only gradient path (top-k itself is not differentiable).
4. the four weighted sums (4 x C) -> LayerNorm(4C) -> Linear(4C -> C_next). The sums are one
   weighted gather (``merge_sums``), so the (k, Kc*m, C) neighbourhood is never materialised.

Deviation: ``max(1, .)`` keeps at least one token where floor(N * d_s) would be 0 (tiny inputs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from affmae.ops import point_gather
from affmae.ops.clustering import Clustering
from affmae.ops.dispatch import package_kernels, plain_eager, triton_device
from affmae.ops.layer_norm import FusedLayerNorm
from affmae.ops.linear import Linear
from affmae.ops.relpos import NUM_RELPOS_FEATURES, relpos_features

NUM_MERGE_WEIGHTS = 4


class NarrowLayerNorm(nn.LayerNorm):
    """LayerNorm over a handful of features, written out in float32 element-wise ops.

    The same function and parameters as ``nn.LayerNorm`` (float32 out, as under autocast). The
    CUDA LayerNorm kernels give every row a thread block; for the merge weights (4 features of
    k x Kc*m rows, 840k rows at 512 px) that took 3 of the 44 ms of an aff_small step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        y = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y


def num_kept(n: int, rate: float) -> int:
    """Tokens kept by a merge of ``n`` tokens at downsampling rate ``rate``."""
    return max(1, math.floor(n * rate))


class TokenMerging(nn.Module):
    def __init__(self, dim: int, dim_out: int, rate: float, norm_backend: str = "auto") -> None:
        super().__init__()
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"downsampling rate d_s must be in (0, 1], got {rate}")
        self.rate = rate
        self.score = Linear(dim, 1)
        self.weight_net = nn.Sequential(
            nn.Linear(NUM_RELPOS_FEATURES, NUM_MERGE_WEIGHTS),
            NarrowLayerNorm(NUM_MERGE_WEIGHTS),
            nn.GELU(),
        )
        self.norm = FusedLayerNorm(NUM_MERGE_WEIGHTS * dim, backend=norm_backend)
        self.reduction = Linear(NUM_MERGE_WEIGHTS * dim, dim_out)

    def neighbour_weights(self, pos: torch.Tensor, pos_k: torch.Tensor, slots: torch.Tensor,
                          imp_n: torch.Tensor) -> torch.Tensor:
        """w = GELU(LN(Linear(relpos(pos[slots] - pos_k)))) * imp_n: (B, k, K, 4) float32.

        pos (B, Np, 2) token positions; slots (B, k, K) neighbour slots; pos_k (B, k, 2) kept
        positions; imp_n (B, k, K) neighbour importance. On CUDA (or the interpreter) one
        Triton kernel each way (``_merge_weights_kernel``); elsewhere, or with
        ``AFFMAE_KERNELS=torch``, the modules below.
        """
        lin, norm = self.weight_net[0], self.weight_net[1]
        params = (lin.weight, lin.bias, norm.weight, norm.bias)
        if package_kernels() and _weights_kernel_ok(pos, pos_k, imp_n, *params):
            return _MergeWeights.apply(pos.float(), pos_k.float(), slots, imp_n, *params, norm.eps)
        B, k, K = slots.shape
        pos_n = torch.gather(pos, 1, slots.reshape(B, k * K, 1).expand(-1, -1, 2)).view(B, k, K, 2)
        rel = relpos_features(pos_n - pos_k[:, :, None])  # (B, k, K, 5)
        w = self.weight_net(rel.to(self.reduction.weight.dtype))  # (B, k, K, 4)
        return w.float() * imp_n[..., None]  # (B, k, K, 4)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, cl: Clustering
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Downsample a clustered token set.

        Args:
            x: (B, M*m, C) clustered tokens (slots >= cl.n_valid are padding). pos: (B, M*m, 2).
        Returns:
            x_new (B, k, C_out), pos_new (B, k, 2), kept (B, k) slot indices (ascending),
            importance (B, M*m) sigmoid scores (padding = 0).
        """
        B, Np, C = x.shape
        m, Kc = cl.m, cl.nbr.shape[-1]
        valid = torch.arange(Np, device=x.device) < cl.n_valid  # (Np,)
        importance = torch.sigmoid(self.score(x).squeeze(-1).float())  # (B, Np)
        importance = importance * valid.to(importance.dtype)

        # 2. top-k over real tokens; ascending slots keep the curve order for the next stage.
        k = num_kept(cl.n_valid, self.rate)
        rank_key = importance.detach().masked_fill(~valid, -1.0)
        kept = torch.topk(rank_key, k, dim=1, sorted=False).indices.sort(dim=1).values  # (B, k)

        # 3. neighbourhood of each kept token = its cluster's neighbour clusters' slots.
        cluster = kept // m  # (B, k)
        nbr_c = torch.gather(cl.nbr, 1, cluster[..., None].expand(-1, -1, Kc))  # (B, k, Kc)
        slots = (nbr_c[..., None] * m + torch.arange(m, device=x.device)).flatten(2)  # (B, k, K)
        K = slots.shape[-1]
        imp_n = torch.gather(importance, 1, slots.reshape(B, k * K)).view(B, k, K)  # padding: 0
        pos_k = torch.gather(pos, 1, kept[..., None].expand(-1, -1, 2))  # (B, k, 2)

        w = self.neighbour_weights(pos, pos_k, slots, imp_n)  # (B, k, K, 4)
        merged = merge_sums(x, slots, w)  # (B, k, 4 * C)
        x_new = self.reduction(self.norm(merged))  # (B, k, C_out)
        return x_new, pos_k, kept, importance


def _weights_kernel_ok(pos, pos_k, imp_n, *params) -> bool:
    """Whether the merge-weight kernels can run: a Triton device, float32 importance and
    parameters (the kernels' precision rules), positions that need no gradient."""
    if not triton_device(pos) or pos.requires_grad or pos_k.requires_grad:
        return False
    if any(t.dtype != torch.float32 for t in (imp_n, *params)) or imp_n.numel() >= 2**31:
        return False  # the kernels' float32 rules; their int32 entry index
    try:
        from affmae.ops import _merge_weights_kernel  # noqa: F401
    except ImportError:
        return False
    return True


class _MergeWeights(torch.autograd.Function):
    """``TokenMerging.neighbour_weights`` through the Triton kernels (``_merge_weights_kernel``):
    one launch each way instead of 68 aten ops (views included); float32 throughout (under
    autocast the modules run their Linear in half precision)."""

    @staticmethod
    def forward(ctx, pos, pos_k, slots, imp, lin_w, lin_b, norm_w, norm_b, eps):
        from affmae.ops import _merge_weights_kernel as K

        args = (pos, pos_k, slots, imp, lin_w, lin_b, norm_w, norm_b)
        ctx.save_for_backward(*args)
        ctx.eps = eps
        if plain_eager(*args):
            return K.merge_weights_fwd(*args, eps)
        return torch.ops.affmae.merge_weights_fwd(*args, eps)

    @staticmethod
    def backward(ctx, gw):
        from affmae.ops import _merge_weights_kernel as K

        args = (gw, *ctx.saved_tensors, ctx.eps)
        if plain_eager(*args[:-1]):
            d_imp, part = K.merge_weights_bwd(*args)
        else:
            d_imp, part = torch.ops.affmae.merge_weights_bwd(*args)
        d_lw, d_lb, d_nw, d_nb = part.split([20, 4, 4, 4])  # contiguous, kept as the .grads
        return (None, None, None, d_imp, d_lw.view(4, 5), d_lb, d_nw, d_nb, None)


def merge_sums(x: torch.Tensor, slots: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """merged[b, n, j*C + c] = sum_s w[b, n, s, j] * x[b, slots[b, n, s], c].

    One weighted gather (``affmae.ops.point_gather``, float32 accumulation): the (B, k, K, C)
    neighbourhood features are never materialised (161 MB per merge at 512 px, batch 16, stage
    1). Channels are split into G groups of at most 128 (the kernel's row width).

    Args:
        x: (B, Np, C) tokens. slots: (B, k, K) neighbour slots. w: (B, k, K, J) weights.
    Returns:
        (B, k, J * C) in x's dtype.
    """
    B, Np, C = x.shape
    k, K, J = w.shape[1], w.shape[2], w.shape[3]
    G = next(g for g in range(1, C + 1) if C % g == 0 and C // g <= 128)
    sel = slots[:, :, None, None, :].expand(B, k, G, 1, K)  # the J weight sets share slots
    wt = w.transpose(2, 3)[:, :, None].expand(B, k, G, J, K)  # (B, k, G, J, K)
    out = point_gather.gather_weighted(x.view(B, Np, G, C // G), sel, wt)  # (B, k, G, J, C/G)
    return out.transpose(2, 3).reshape(B, k, J * C)
