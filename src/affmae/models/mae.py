"""AFFMAE: masked-autoencoder pretraining of an AFF encoder with a point-based decoder.

MAE's split (facebookresearch/mae): masking (outside, ``affmae.ops.masking``) ->
``forward_encoder`` (visible tokens only) -> ``forward_decoder`` (queries at masked positions)
-> ``forward_loss`` (MSE on masked patches, plus deep supervision, DESIGN 2.7):

    loss = final + aux_weights[stage 3] * after-stage-3 + aux_weights[stage 4] * after-stage-4

A zero weight removes that head entirely (no parameters, no compute). ``pred_ratio`` < 1 queries
only a random subset of the masked patches (CrossMAE-style): the decoder's cross-attention
queries are independent of each other, so this is an unbiased, cheaper loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from affmae.layers.common import checkpoints, init_weights
from affmae.layers.decoder import PointDecoder
from affmae.models.aff import AFFConfig, AFFEncoder, TokenSet
from affmae.models.registry import register_model, replace_config
from affmae.ops.clustering import gather_tokens
from affmae.ops.layer_norm import FusedLayerNorm
from affmae.ops.linear import Linear
from affmae.ops.linear.casts import casts_weights_once
from affmae.ops.masking import mask_indices, sample_queries
from affmae.ops.patches import grid_positions, patchify, unpatchify


@dataclass(frozen=True)
class AFFMAEConfig(AFFConfig):
    """AFF encoder fields (inherited) plus the decoder and loss."""

    decoder_dim: int = 384  # decoder width
    decoder_heads: int = 6  # decoder attention heads
    decoder_points: int = 4  # sampling points per head
    decoder_knn: int = 4  # K nearest tokens interpolated at each sampling point
    decoder_mlp_ratio: float = 2.0  # decoder FFN hidden width / decoder_dim
    decoder_blocks_per_stage: int = 1  # decoder blocks per encoder stage
    decoder_nbr_clusters: int = 12  # source clusters searched per 4x4-cell tile (KNN bound)
    aux_weights: tuple[float, ...] = (0.05, 0.12)  # deep supervision, deepest stage first (4, 3)
    norm_pix_loss: bool = False  # normalise each target patch by its own mean/std
    pred_ratio: float = 1.0  # fraction of masked patches reconstructed per step

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.aux_weights) >= len(self.widths):
            raise ValueError(f"aux_weights {self.aux_weights} needs fewer entries than the "
                             f"{len(self.widths)} stages (the finest stage has the main head)")
        if any(w < 0 for w in self.aux_weights):
            raise ValueError(f"aux_weights must be >= 0, got {self.aux_weights}")
        if not 0.0 < self.pred_ratio <= 1.0:
            raise ValueError(f"pred_ratio must be in (0, 1], got {self.pred_ratio}")
        if self.decoder_blocks_per_stage < 1:
            raise ValueError(f"decoder_blocks_per_stage must be >= 1, got "
                             f"{self.decoder_blocks_per_stage}")

    def encoder_config(self) -> AFFConfig:
        names = {f.name for f in fields(AFFConfig)}
        return AFFConfig(**{n: getattr(self, n) for n in names})


def _head(dim: int, out: int, norm_backend: str = "auto") -> nn.Sequential:
    # The norm feeds only the Linear: the fused norm (output in the autocast dtype) applies.
    return nn.Sequential(FusedLayerNorm(dim, backend=norm_backend), Linear(dim, out))


class AFFMAE(nn.Module):
    def __init__(self, config: AFFMAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_size = c.patch_size
        self.encoder = AFFEncoder(c.encoder_config())
        self.decoder = PointDecoder(
            c.widths, c.decoder_dim, c.decoder_heads, c.decoder_points, c.decoder_knn,
            c.decoder_mlp_ratio, c.decoder_blocks_per_stage, c.cluster_size,
            c.decoder_nbr_clusters, grad_checkpoint=checkpoints(c.grad_checkpoint, "decoder"),
            norm_backend=c.norm_backend)
        out = c.in_chans * c.patch_size**2
        self.head = _head(c.decoder_dim, out, c.norm_backend)
        # aux_heads["4"] reads the decoder after the stage-4 blocks, etc.; zero weight = no head.
        S = len(c.widths)
        self.aux_heads = nn.ModuleDict({
            str(S - i): _head(c.decoder_dim, out, c.norm_backend)
            for i, w in enumerate(c.aux_weights) if w > 0
        })
        self.decoder.apply(init_weights)
        self.head.apply(init_weights)
        self.aux_heads.apply(init_weights)
        self.decoder.reset_parameters()

    # -- MAE split -------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, visible_idx: torch.Tensor) -> list[TokenSet]:
        return self.encoder.forward_intermediates(imgs, visible_idx)

    def forward_decoder(self, stages: list[TokenSet], query_idx: torch.Tensor,
                        grid_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Predicted patches (B, Nq, C*P*P) at the raster indices ``query_idx``, per head."""
        feats = self.decoder(stages, grid_positions(query_idx, grid_hw[1]), grid_hw)
        S = len(stages)
        preds = {"pred": self.head(feats[-1])}
        for stage, head in self.aux_heads.items():
            preds[f"pred_ds{stage}"] = head(feats[S - int(stage)])
        return preds

    def forward_loss(self, imgs: torch.Tensor, query_idx: torch.Tensor,
                     preds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = gather_tokens(patchify(imgs, self.patch_size), query_idx).float()
        if self.config.norm_pix_loss:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        S = len(self.config.widths)
        out = {"loss_rec": F.mse_loss(preds["pred"].float(), target)}
        loss = out["loss_rec"]
        for i, w in enumerate(self.config.aux_weights):
            if w > 0:
                key = f"ds{S - i}"
                out[f"loss_{key}"] = F.mse_loss(preds[f"pred_{key}"].float(), target)
                loss = loss + w * out[f"loss_{key}"]
        out["loss"] = loss
        return out

    @casts_weights_once
    def forward(self, imgs: torch.Tensor, is_masked: torch.Tensor,
                generator: torch.Generator | None = None,
                num_masked: int | None = None) -> dict[str, torch.Tensor]:
        """imgs (B, C, H, W) normalised; is_masked (B, gh*gw) bool -> losses, "pred" (B, Nq, C*P*P)
        and "pred_idx" (B, Nq) raster indices of the predicted patches (ascending).
        ``generator`` draws the pred_ratio subset (global RNG when None); ``num_masked``, when
        the caller knows it, avoids reading the mask back (no host sync: CUDA-graph safe)."""
        P = self.patch_size
        grid_hw = (imgs.shape[-2] // P, imgs.shape[-1] // P)
        if is_masked.shape != (imgs.shape[0], grid_hw[0] * grid_hw[1]):
            raise ValueError(f"is_masked has shape {tuple(is_masked.shape)}, expected "
                             f"{(imgs.shape[0], grid_hw[0] * grid_hw[1])} for images "
                             f"{tuple(imgs.shape)} and patch {P}")
        visible_idx, masked_idx = mask_indices(is_masked, num_masked)
        ratio = self.config.pred_ratio if self.training else 1.0
        query_idx = sample_queries(masked_idx, ratio, generator) if ratio < 1.0 else masked_idx
        stages = self.forward_encoder(imgs, visible_idx)
        preds = self.forward_decoder(stages, query_idx, grid_hw)
        out = self.forward_loss(imgs, query_idx, preds)
        out["pred"] = preds["pred"]
        out["pred_idx"] = query_idx
        return out

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, is_masked: torch.Tensor) -> torch.Tensor:
        """Visible patches from the input, masked patches predicted: (B, C, H, W)."""
        P = self.patch_size
        grid_hw = (imgs.shape[-2] // P, imgs.shape[-1] // P)
        visible_idx, masked_idx = mask_indices(is_masked)
        stages = self.forward_encoder(imgs, visible_idx)
        pred = self.forward_decoder(stages, masked_idx, grid_hw)["pred"].to(imgs.dtype)
        patches = patchify(imgs, P).clone()
        if self.config.norm_pix_loss:  # show the prediction in the patch's own statistics
            tgt = gather_tokens(patches, masked_idx)
            pred = pred * (tgt.var(-1, keepdim=True) + 1e-6).sqrt() + tgt.mean(-1, keepdim=True)
        patches.scatter_(1, masked_idx[..., None].expand(-1, -1, patches.shape[-1]), pred)
        return unpatchify(patches, grid_hw, P)

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {"decoder.query_token"}

    # -- fine-tuning (affmae.models.segmentation) ------------------------------------------
    def dense_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder, decoder queried at every patch: (B, gh*gw, decoder_dim).

        Deviation (DESIGN is silent on the query start in fine-tuning): a query starts from the
        learned token plus its patch's own stage-1 token (through the finest decoder block's
        pretrained source projection), as a ViT-MAE decoder sees every encoder token in
        fine-tuning. Starting from the learned token alone, the decoder's output followed the
        query position more than the image (demo: held-out mIoU 0.344 -> 0.408; 8 synthetic
        128 px images with 64 px random crops, 300 steps: 0.414 -> 0.642).
        """
        return self.dense_decoder_features(imgs)[-1]

    def dense_decoder_features(self, imgs: torch.Tensor, after: str = "block") -> list[torch.Tensor]:
        """The decoder at every patch after each stage, coarse to fine: list of
        (B, gh*gw, decoder_dim) in raster order; ``after="cross"`` takes each stage's features
        right after its cross-attention (see ``PointDecoder.forward``)."""
        P = self.patch_size
        grid_hw = (imgs.shape[-2] // P, imgs.shape[-1] // P)
        all_idx = torch.arange(grid_hw[0] * grid_hw[1], device=imgs.device)
        all_idx = all_idx.expand(imgs.shape[0], -1)
        stages = self.encoder.forward_intermediates(imgs)
        # Every query has its own stage-1 token (nothing is masked): start the query from it,
        # through the finest block's (pretrained) source projection, back in raster order.
        first = stages[0]
        own = gather_tokens(first.x, first.clustering.inverse(), first.clustering.perm)  # (B, N, C1)
        query_init = self.decoder.blocks[-1][0].src_proj(own)  # (B, N, decoder_dim)
        return self.decoder(stages, grid_positions(all_idx, grid_hw[1]), grid_hw, query_init,
                            after)

    def strip_pretraining_heads(self) -> None:
        """Drop the pixel heads (unused in fine-tuning; DDP would see unused parameters)."""
        del self.head
        self.aux_heads = nn.ModuleDict()

    @property
    def num_layers(self) -> int:
        return len(self.config.depths)

    def layer_id(self, name: str) -> int:
        """LLRD depth, per stage: 0 patch embedding, s for everything of stage s (its blocks,
        output norm and the merge that ends it), S + 1 decoder and heads. Per-block depth
        would give aff_small's patch embedding 0.6 ** 17 of the lr at the paper's decay."""
        if name.startswith(("encoder.patch_embed", "encoder.embed_norm")):
            return 0
        if name.startswith(("encoder.stages.", "encoder.merges.", "encoder.out_norms.")):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1


def _build(base: AFFMAEConfig, overrides: dict) -> AFFMAE:
    return AFFMAE(replace_config(base, overrides))


@register_model("aff_small")
def aff_small(**overrides) -> AFFMAE:
    """AFF-Small (DESIGN 4): widths 96-512, depths 2-3-9-2, head dim 32, d_s 0.4."""
    return _build(AFFMAEConfig(), overrides)


@register_model("aff_tiny")
def aff_tiny(**overrides) -> AFFMAE:
    """A tiny AFFMAE for tests and the CPU demo."""
    base = AFFMAEConfig(widths=(32, 48, 64, 96), depths=(1, 1, 1, 1), heads=(2, 2, 2, 3),
                        drop_path=0.0, decoder_dim=64, decoder_heads=2, decoder_points=4)
    return _build(base, overrides)
