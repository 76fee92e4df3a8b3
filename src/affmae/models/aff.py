"""AutoFocusFormer encoder over visible tokens only (AFF, Ziwen et al. 2023; AFFMAE sec. 3.1).

Data flow (DESIGN 2.3-2.4): visible patches -> Linear patch embedding (no pixel of a masked patch
reaches any token) -> four stages, each: balanced clustering -> cluster-attention blocks ->
(stages 1-3) importance top-k + point-based merging. Every stage outputs its pre-merge tokens
(LayerNorm'd) with positions and clustering, for the decoder.

Deviation from the AFF code: a Linear patch embedding instead of the overlapping conv stem (a
conv would mix masked pixels into visible tokens); the encoder runs unmasked by passing every
patch as visible, with no architectural difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from affmae.layers.attention import ClusterAttention
from affmae.layers.block import AFFBlock
from affmae.layers.common import (StochasticDepth, check_grad_checkpoint, checkpoints,
                                  init_weights, run_chained)
from affmae.layers.merge import TokenMerging
from affmae.ops.clustering import Clustering, balanced_clustering, gather_tokens, pad_tokens
from affmae.ops.layer_norm import FusedLayerNorm
from affmae.ops.linear import Linear
from affmae.ops.patches import grid_positions, patchify


@dataclass(frozen=True)
class AFFConfig:
    """Architecture of an AFF encoder."""

    patch_size: int = 8  # P: pixels per patch side
    in_chans: int = 1  # image channels (grayscale EM)
    widths: tuple[int, ...] = (96, 192, 384, 512)  # channels C of each stage
    depths: tuple[int, ...] = (2, 3, 9, 2)  # transformer blocks per stage
    heads: tuple[int, ...] = (3, 6, 12, 16)  # attention heads per stage
    mlp_ratio: float = 2.0  # MLP hidden width / C
    cluster_size: int = 8  # m: tokens per cluster
    nbr_clusters: int = 8  # Kc: clusters per neighbourhood (K = Kc * m keys)
    downsample_rate: float = 0.4  # d_s: fraction of tokens kept by each merge
    drop_path: float = 0.1  # stochastic depth, linearly increasing over blocks
    attention_backend: str = "auto"  # "auto" | "triton" | "torch"
    # LayerNorms that feed a Linear (blocks, merges, decoder blocks): "auto" (Triton on CUDA,
    # output in the autocast dtype, affmae.ops.layer_norm), "triton", "torch" (nn.LayerNorm).
    norm_backend: str = "auto"
    # Recompute activations in the backward instead of keeping them (memory for time), per
    # transformer block: "none" | "encoder" | "decoder" (AFFMAE's decoder blocks) | "all".
    grad_checkpoint: str = "none"

    def __post_init__(self) -> None:
        n = len(self.widths)
        if not (len(self.depths) == len(self.heads) == n and n >= 1):
            raise ValueError(
                f"widths {self.widths}, depths {self.depths} and heads {self.heads} must have "
                "the same (non-zero) length"
            )
        for w, h in zip(self.widths, self.heads):
            if w % h != 0:
                raise ValueError(f"stage width {w} is not divisible by its {h} heads")
        if not 0.0 < self.downsample_rate <= 1.0:
            raise ValueError(f"downsample_rate must be in (0, 1], got {self.downsample_rate}")
        if self.patch_size < 1 or self.cluster_size < 1 or self.nbr_clusters < 1:
            raise ValueError("patch_size, cluster_size and nbr_clusters must be positive")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"attention_backend must be auto|triton|torch, got "
                             f"{self.attention_backend!r}")
        check_grad_checkpoint(self.grad_checkpoint)
        if self.norm_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"norm_backend must be auto|triton|torch, got {self.norm_backend!r}")


@dataclass
class TokenSet:
    """One stage's output: tokens in clustered order (real tokens only).

    x: (B, N, C) features, pos: (B, N, 2) positions, clustering: the stage's clusters (its
    centroids and neighbourhoods index these tokens after padding to M * m).
    """

    x: torch.Tensor
    pos: torch.Tensor
    clustering: Clustering


class AFFEncoder(nn.Module):
    def __init__(self, config: AFFConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = Linear(c.in_chans * c.patch_size**2, c.widths[0])
        # float32 outputs (nn.LayerNorm's under autocast): they start the residual stream and
        # are the stages' outputs; one Triton kernel each way on CUDA all the same
        self.embed_norm = FusedLayerNorm(c.widths[0], backend=c.norm_backend, autocast_out=False)
        rates = torch.linspace(0, c.drop_path, sum(c.depths)).tolist()
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.out_norms = nn.ModuleList()
        i = 0
        for s, (w, d, h) in enumerate(zip(c.widths, c.depths, c.heads)):
            blocks = [AFFBlock(w, h, c.mlp_ratio, rates[i + j], c.attention_backend,
                               c.norm_backend) for j in range(d)]
            i += d
            self.stages.append(nn.ModuleList(blocks))
            self.out_norms.append(FusedLayerNorm(w, backend=c.norm_backend, autocast_out=False))
            if s + 1 < len(c.widths):
                self.merges.append(TokenMerging(w, c.widths[s + 1], c.downsample_rate,
                                                c.norm_backend))
        self.stochastic_depth = StochasticDepth(rates)
        self.apply(init_weights)
        for mod in self.modules():
            if isinstance(mod, ClusterAttention):
                mod.reset_parameters()

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward_tokens(
        self, patches: torch.Tensor, pos: torch.Tensor, grid_hw: tuple[int, int]
    ) -> list[TokenSet]:
        """Encode a set of patches.

        Args:
            patches: (B, N, in_chans*P*P) pixels of the visible patches.
            pos: (B, N, 2) their grid positions. grid_hw: (gh, gw) of the image.
        Returns:
            One TokenSet per stage (pre-merge, LayerNorm'd).
        """
        c = self.config
        x = self.embed_norm(self.patch_embed(patches))  # (B, N, C1)
        outputs: list[TokenSet] = []
        draws = self.stochastic_depth.draw(x.shape[0], x.device)  # (blocks, 2, B) factors, one draw
        drops = iter(draws if draws is not None else ())
        for s, blocks in enumerate(self.stages):
            with record_function("aff/cluster"):
                cl = balanced_clustering(pos, grid_hw, c.cluster_size, c.nbr_clusters)
                x = pad_tokens(gather_tokens(x, cl.perm, cl.inverse()), cl.n_padded)  # (B, M*m, C)
                pos = pad_tokens(gather_tokens(pos, cl.perm), cl.n_padded)  # (B, M*m, 2)
            # each block's drop-path factors from the one draw (or None)
            x = run_chained(blocks, checkpoints(c.grad_checkpoint, "encoder"), x, pos, cl,
                            per_block=[next(drops, None) for _ in blocks])
            n = cl.n_valid
            outputs.append(TokenSet(self.out_norms[s](x[:, :n]), pos[:, :n], cl))
            if s < len(self.merges):
                with record_function("aff/merge"):
                    x, pos, _, _ = self.merges[s](x, pos, cl)
        return outputs

    def forward_intermediates(
        self, imgs: torch.Tensor, visible_idx: torch.Tensor | None = None
    ) -> list[TokenSet]:
        """(B, in_chans, H, W) images, optional (B, Nv) visible raster indices -> stage outputs."""
        P = self.config.patch_size
        gh, gw = imgs.shape[-2] // P, imgs.shape[-1] // P
        patches = patchify(imgs, P)  # (B, gh*gw, C*P*P)
        if visible_idx is None:
            visible_idx = torch.arange(gh * gw, device=imgs.device).expand(imgs.shape[0], -1)
        patches = gather_tokens(patches, visible_idx)  # (B, Nv, C*P*P)
        pos = grid_positions(visible_idx, gw)
        return self.forward_tokens(patches, pos, (gh, gw))

    def forward_features(self, imgs: torch.Tensor) -> TokenSet:
        """Unmasked encoding; returns the last stage's tokens."""
        return self.forward_intermediates(imgs)[-1]

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith(("blank_k", "blank_v"))}
