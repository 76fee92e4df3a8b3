"""Semantic segmentation on a pretrained MAE backbone (AFFMAE sec. 4.1 "Fine-tuning"; DESIGN 2).

The pretrained encoder runs unmasked and the pretrained decoder is queried at every patch
position (``backbone.dense_features``); a head maps each query to P*P*classes logits, i.e.
per-pixel class logits of its patch. The pixel-reconstruction heads of pretraining are dropped
(``backbone.strip_pretraining_heads``). Works for every MAE family that offers
``dense_features``, ``strip_pretraining_heads``, ``layer_id`` and ``num_layers``.

Layer-wise lr decay (LLRD) reads ``layer_id(name)``: 0 for the patch embedding, 1..L for the
encoder's blocks in order, L + 1 for the decoder and the head (lr scale decay ** (L + 1 - id)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from affmae.layers.common import init_weights
from affmae.ops.layer_norm import FusedLayerNorm
from affmae.ops.linear import Linear
from affmae.ops.linear.casts import casts_weights_once
from affmae.ops.patches import unpatchify
from affmae.models.registry import create_model, read_checkpoint, register_model, replace_config


@dataclass(frozen=True)
class SegmenterConfig:
    """A registered MAE backbone and a per-pixel classification head."""

    backbone: str = "aff_small"  # registered MAE model name
    backbone_config: dict[str, Any] = field(default_factory=dict)  # overrides / full config
    num_classes: int = 2  # output classes (background included)
    class_names: tuple[str, ...] = ()  # optional names, one per class

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")


class Segmenter(nn.Module):
    def __init__(self, config: SegmenterConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        if backbone is None:
            backbone = create_model(config.backbone, **config.backbone_config)
        backbone.strip_pretraining_heads()
        self.backbone = backbone
        self.patch_size = int(backbone.patch_size)
        dim = backbone.config.decoder_dim
        self.head = nn.Sequential(FusedLayerNorm(dim, backend=backbone.config.norm_backend),
                                  Linear(dim, self.patch_size**2 * config.num_classes))
        self.head.apply(init_weights)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @casts_weights_once
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, classes, H, W) logits."""
        P = self.patch_size
        grid_hw = (imgs.shape[-2] // P, imgs.shape[-1] // P)
        feats = self.backbone.dense_features(imgs)  # (B, gh*gw, dim) in raster order
        return unpatchify(self.head(feats), grid_hw, P)  # (B, classes, H, W)

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def layer_id(self, name: str) -> int:
        """LLRD depth of a parameter: backbone's own ids; the new head is the top layer."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone."):])
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    @classmethod
    def from_pretrained(cls, path: str, num_classes: int, class_names: tuple[str, ...] = (),
                        **backbone_overrides: Any) -> "Segmenter":
        """Build from an MAE pretraining checkpoint (.pt or .safetensors); loads its weights."""
        ckpt = read_checkpoint(path)
        cfg = dict(ckpt["model_config"])
        cfg.update(backbone_overrides)
        backbone = create_model(ckpt["model_name"], **cfg)
        backbone.load_state_dict(ckpt["model"])
        from affmae.models.registry import config_dict

        seg_cfg = SegmenterConfig(backbone=ckpt["model_name"], backbone_config=config_dict(backbone),
                                  num_classes=num_classes, class_names=tuple(class_names))
        model = cls(seg_cfg, backbone)
        model.model_name = "segmenter"
        if "data_stats" in ckpt:
            model.data_stats = dict(ckpt["data_stats"])
        return model


@register_model("segmenter")
def segmenter(**overrides: Any) -> Segmenter:
    """Segmentation model; ``backbone`` names the MAE family and size (default aff_small)."""
    return Segmenter(replace_config(SegmenterConfig(), overrides))
