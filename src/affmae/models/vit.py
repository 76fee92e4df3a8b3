"""ViT-MAE baseline and ViT-CrossMAE: the dense models AFFMAE is measured against.

Paper: AFFMAE Table 1 / Figure 10 compare AFF-Small with a ViT-S/8 MAE (DESIGN 4): patch 8,
width 384, depth 8, 6 heads, MLP ratio 4, fixed 2-D sine-cosine positions; MAE decoder width 384,
depth 4, 6 heads (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2022). Same
masking and loss as AFFMAE: the encoder sees the visible patches only, the head predicts the
P*P pixels of masked patches, MSE on the dataset-normalised target (per-patch normalisation
optional). Attention runs through ``F.scaled_dot_product_attention`` (flash on GPUs).

Two decoders, chosen by ``ViTMAEConfig.decoder``:

* ``"mae"``: mask tokens + sin-cos positions for every masked patch, full self-attention over
  visible and mask tokens (He et al.).
* ``"cross"`` (CrossMAE, Fu et al., "Rethinking Patch Dependence for Masked Autoencoders", TMLR
  2025): queries are a mask token + the position of a masked patch; each block is cross-attention
  from the queries into the (embedded) encoder tokens, then an FFN. Queries never attend to each
  other, so a query's prediction depends on the encoder tokens and its own position only, and
  the decoder can reconstruct a random subset of the masked patches (``pred_ratio``).

Deliberate deviations from the reference codes:
* No class token (the models are pretrained for dense prediction; positions are per grid size,
  so any H, W that are multiples of P work, not only the pretraining size).
* Patch embedding is a Linear on the visible patches' pixels (equivalent to MAE's stride-P conv,
  but masked patches are never embedded, so masked pixels cannot reach the encoder).
* CrossMAE's inter-block attention (queries reading a learned mix of encoder layers) is left out:
  every decoder block reads the last encoder layer's output, as in CrossMAE's ablated default.
* ``pred_ratio`` < 1 samples a subset only in training mode (``model.train()``); in eval mode and
  in ``reconstruct`` every masked patch is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from affmae.layers.common import (DropPath, Mlp, StochasticDepth, check_grad_checkpoint,
                                  checkpoints, init_weights, run_chained, sincos_embed_2d)
from affmae.ops.layer_norm import FusedLayerNorm
from affmae.ops.linear import Linear
from affmae.ops.linear.casts import casts_weights_once
from affmae.ops.patches import grid_positions, patchify, unpatchify
from affmae.models.registry import register_model, replace_config
from affmae.ops.masking import mask_indices, sample_queries

DECODERS = ("mae", "cross")


@dataclass(frozen=True)
class ViTMAEConfig:
    """Architecture of a ViT masked autoencoder (encoder, decoder, loss)."""

    patch_size: int = 8  # P: pixels per patch side
    in_chans: int = 1  # image channels (grayscale EM)
    embed_dim: int = 384  # C: encoder width
    depth: int = 8  # encoder blocks
    num_heads: int = 6  # encoder attention heads (head dim = embed_dim / num_heads)
    mlp_ratio: float = 4.0  # encoder MLP hidden width / C
    drop_path: float = 0.0  # encoder stochastic depth, linearly increasing over blocks
    decoder: str = "mae"  # "mae": self-attention over visible + mask tokens; "cross": CrossMAE
    decoder_dim: int = 384  # decoder width
    decoder_depth: int = 4  # decoder blocks
    decoder_heads: int = 6  # decoder attention heads
    decoder_mlp_ratio: float = 4.0  # decoder MLP hidden width / decoder_dim
    pred_ratio: float = 1.0  # fraction of masked patches reconstructed per training step ("cross")
    norm_pix_loss: bool = False  # normalise each target patch by its own mean/std (MAE option)
    # Recompute block activations in the backward (memory for time), as AFF's field:
    # "none" | "encoder" | "decoder" | "all".
    grad_checkpoint: str = "none"
    # Block LayerNorms (they feed Linears), as AFF's field: "torch" | "triton" | "auto".
    norm_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("patch_size", "in_chans", "depth", "num_heads", "decoder_depth",
                     "decoder_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name, dim, heads in (("embed_dim", self.embed_dim, self.num_heads),
                                 ("decoder_dim", self.decoder_dim, self.decoder_heads)):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4 or dim % 4:
                # sin-cos positions need a quarter of the width each for sin/cos of x and y
                raise ValueError(f"{name} must be a positive multiple of 4, got {dim!r}")
            if dim % heads:
                raise ValueError(f"{name}={dim} is not divisible by its head count {heads}")
        for name in ("mlp_ratio", "decoder_mlp_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if not 0.0 < self.pred_ratio <= 1.0:
            raise ValueError(f"pred_ratio must be in (0, 1], got {self.pred_ratio!r}")
        check_grad_checkpoint(self.grad_checkpoint)
        if self.norm_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"norm_backend must be auto|triton|torch, got {self.norm_backend!r}")
        if self.pred_ratio < 1.0 and self.decoder != "cross":
            # The MAE decoder's mask tokens attend to each other: dropping some would change the
            # predictions of the rest and save no compute, so the option would be misleading.
            raise ValueError(
                f"pred_ratio={self.pred_ratio} needs decoder='cross' (got decoder={self.decoder!r})"
            )


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------


def _pos_embed(idx: torch.Tensor, gw: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Raster indices (B, N) -> (B, N, dim) fixed sin-cos embedding of their (x, y) cells."""
    return sincos_embed_2d(grid_positions(idx, gw), dim).to(dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int, label: str) -> None:
        super().__init__()
        self.heads = heads
        self.label = label  # record_function label, so profiles group time by component
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H = self.heads
        with record_function(self.label):
            # unbind, not qkv[0], qkv[1], qkv[2]: the backward of three selects zero-fills and
            # copies three full (3, B, H, N, D) buffers and adds them (6.3 of 47 ms of a
            # vit_small step at 512 px on an H200); unbind's is one stack into the qkv layout.
            q, k, v = (t.transpose(1, 2) for t in
                       self.qkv(x).reshape(B, N, 3, H, C // H).unbind(2))  # (B, H, N, D) each
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
            out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
            return self.proj(out)


class CrossAttention(nn.Module):
    """Multi-head attention from queries (B, Nq, C) into a memory (B, Nk, C); queries never
    attend to each other."""

    def __init__(self, dim: int, heads: int, label: str) -> None:
        super().__init__()
        self.heads = heads
        self.label = label
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        B, Nq, C = x.shape
        Nk = mem.shape[1]
        H = self.heads
        with record_function(self.label):
            q = self.q(x).reshape(B, Nq, H, C // H).transpose(1, 2)  # (B, H, Nq, D)
            k, v = (t.transpose(1, 2) for t in
                    self.kv(mem).reshape(B, Nk, 2, H, C // H).unbind(2))  # (B, H, Nk, D) each
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Nq, D)
            out = out.transpose(1, 2).reshape(B, Nq, C)  # (B, Nq, C)
            return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float, label: str,
                 norm_backend: str = "auto"):
        super().__init__()
        self.norm1 = FusedLayerNorm(dim, backend=norm_backend)
        self.attn = SelfAttention(dim, heads, label)
        self.norm2 = FusedLayerNorm(dim, backend=norm_backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    @property
    def input_norm(self) -> FusedLayerNorm:
        """The norm of the block's input (``run_chained`` fuses it into the previous block)."""
        return self.norm1

    def forward(self, x: torch.Tensor, drop: torch.Tensor | None = None,
                h: torch.Tensor | None = None, next_norm: FusedLayerNorm | None = None):
        """``drop``: (2, B) drop-path factors of the two branches (``StochasticDepth``), or None
        (the block's DropPath draws them). ``h``: ``norm1(x)`` when the caller has it;
        ``next_norm``: the next block's input norm, fused with the last residual step, which
        then returns ``(x, next_norm(x))`` (``run_chained``)."""
        f_attn, f_mlp = (None, None) if drop is None else drop
        h = self.norm1(x) if h is None else h
        x, h = self.norm2.residual(x, self.attn(h), self.drop_path, f_attn)
        if next_norm is not None:
            return next_norm.residual(x, self.mlp(h), self.drop_path, f_mlp)
        return self.drop_path.residual_add(x, self.mlp(h), f_mlp)


class CrossBlock(nn.Module):
    """CrossMAE decoder block: x + cross-attn(LN(x), LN(mem)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, label: str,
                 norm_backend: str = "auto") -> None:
        super().__init__()
        self.norm_q = FusedLayerNorm(dim, backend=norm_backend)
        self.norm_kv = FusedLayerNorm(dim, backend=norm_backend)
        self.attn = CrossAttention(dim, heads, label)
        self.norm2 = FusedLayerNorm(dim, backend=norm_backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    @property
    def input_norm(self) -> FusedLayerNorm:
        """The norm of the queries (``run_chained`` fuses it into the previous block)."""
        return self.norm_q

    def forward(self, x: torch.Tensor, mem: torch.Tensor, h: torch.Tensor | None = None,
                next_norm: FusedLayerNorm | None = None):
        """``h``, ``next_norm``: as ``Block.forward``'s."""
        h = self.norm_q(x) if h is None else h
        x, h = self.norm2.residual(x, self.attn(h, self.norm_kv(mem)))
        if next_norm is not None:
            return next_norm.residual(x, self.mlp(h))
        return x + self.mlp(h)


class ViTEncoder(nn.Module):
    """Patch embedding + sin-cos positions + pre-norm blocks + final LayerNorm, over any token
    subset of the patch grid."""

    def __init__(self, c: ViTMAEConfig) -> None:
        super().__init__()
        self.checkpointed = checkpoints(c.grad_checkpoint, "encoder")  # see run_block
        self.patch_embed = Linear(c.in_chans * c.patch_size**2, c.embed_dim)
        rates = torch.linspace(0, c.drop_path, c.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, r, "vit/attention", c.norm_backend)
            for r in rates
        )
        self.norm = FusedLayerNorm(c.embed_dim, backend=c.norm_backend, autocast_out=False)
        self.stochastic_depth = StochasticDepth(rates)

    def forward(
        self, patches: torch.Tensor, idx: torch.Tensor, gw: int, taps: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """patches: (B, N, in_chans*P*P) pixels, idx: (B, N) their raster indices, gw: grid
        width; taps: block indices whose outputs to return (un-normalised).
        Returns (B, N, C) normalised output and the tapped (B, N, C) block outputs."""
        x = self.patch_embed(patches)  # (B, N, C)
        x = x + _pos_embed(idx, gw, x.shape[-1], x.dtype)
        tapped = []
        drops = self.stochastic_depth.draw(x.shape[0], x.device)  # every block's factors, one draw

        def tap(i: int, y: torch.Tensor) -> None:
            if i in taps:
                tapped.append(y)

        x = run_chained(self.blocks, self.checkpointed, x, per_block=drops, each=tap)
        return self.norm(x), tapped


class MAEDecoder(nn.Module):
    """MAE decoder: visible tokens and mask tokens on the full grid, self-attention over all."""

    def __init__(self, c: ViTMAEConfig) -> None:
        super().__init__()
        self.checkpointed = checkpoints(c.grad_checkpoint, "decoder")  # see run_block
        self.embed = Linear(c.embed_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.blocks = nn.ModuleList(
            Block(c.decoder_dim, c.decoder_heads, c.decoder_mlp_ratio, 0.0, "decoder/attention",
                  c.norm_backend) for _ in range(c.decoder_depth)
        )
        self.norm = FusedLayerNorm(c.decoder_dim, backend=c.norm_backend)  # feeds the head
        self.head = Linear(c.decoder_dim, c.in_chans * c.patch_size**2)

    def forward(self, x: torch.Tensor, visible_idx: torch.Tensor, query_idx: torch.Tensor,
                grid_hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, Nv, C) encoder output at visible_idx (B, Nv); query_idx: (B, Nq) masked patches
        to predict -> (B, Nq, in_chans*P*P). Every non-visible cell gets a mask token."""
        return self.head(self.features(x, visible_idx, query_idx, grid_hw))

    def features(self, x: torch.Tensor, visible_idx: torch.Tensor, query_idx: torch.Tensor,
                 grid_hw: tuple[int, int]) -> torch.Tensor:
        """As ``forward``, before the pixel head: (B, Nq, decoder_dim)."""
        gh, gw = grid_hw
        y = self.embed(x)  # (B, Nv, Cd)
        B, _, Cd = y.shape
        L = gh * gw
        full = self.mask_token.to(y.dtype).expand(B, L, Cd)
        full = full.scatter(1, visible_idx.unsqueeze(-1).expand(-1, -1, Cd), y)  # (B, L, Cd)
        all_idx = torch.arange(L, device=y.device).expand(B, L)
        full = full + _pos_embed(all_idx, gw, Cd, y.dtype)
        full = run_chained(self.blocks, self.checkpointed, full)
        out = full.gather(1, query_idx.unsqueeze(-1).expand(-1, -1, Cd))  # (B, Nq, Cd)
        return self.norm(out)


class CrossDecoder(nn.Module):
    """CrossMAE decoder: queries (mask token + position) cross-attend to the encoder tokens."""

    def __init__(self, c: ViTMAEConfig) -> None:
        super().__init__()
        self.checkpointed = checkpoints(c.grad_checkpoint, "decoder")  # see run_block
        self.embed = Linear(c.embed_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.blocks = nn.ModuleList(
            CrossBlock(c.decoder_dim, c.decoder_heads, c.decoder_mlp_ratio, "decoder/attention",
                       c.norm_backend) for _ in range(c.decoder_depth)
        )
        self.norm = FusedLayerNorm(c.decoder_dim, backend=c.norm_backend)  # feeds the head
        self.head = Linear(c.decoder_dim, c.in_chans * c.patch_size**2)

    def forward(self, x: torch.Tensor, visible_idx: torch.Tensor, query_idx: torch.Tensor,
                grid_hw: tuple[int, int]) -> torch.Tensor:
        """Same contract as ``MAEDecoder.forward``; each output row depends only on the encoder
        tokens and its own query position."""
        return self.head(self.features(x, visible_idx, query_idx, grid_hw))

    def features(self, x: torch.Tensor, visible_idx: torch.Tensor, query_idx: torch.Tensor,
                 grid_hw: tuple[int, int]) -> torch.Tensor:
        """As ``forward``, before the pixel head: (B, Nq, decoder_dim)."""
        gw = grid_hw[1]
        mem = self.embed(x)  # (B, Nv, Cd)
        Cd = mem.shape[-1]
        mem = mem + _pos_embed(visible_idx, gw, Cd, mem.dtype)
        q = self.mask_token.to(mem.dtype) + _pos_embed(query_idx, gw, Cd, mem.dtype)  # (B, Nq, Cd)
        q = run_chained(self.blocks, self.checkpointed, q, mem)
        return self.norm(q)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class ViTMAE(nn.Module):
    """ViT masked autoencoder (MAE or CrossMAE decoder) with the package's MAE interface."""

    def __init__(self, config: ViTMAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config)
        self.decoder = MAEDecoder(config) if config.decoder == "mae" else CrossDecoder(config)
        self.apply(init_weights)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def _grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        P = self.config.patch_size
        if imgs.dim() != 4 or imgs.shape[1] != self.config.in_chans:
            raise ValueError(
                f"imgs must be (B, {self.config.in_chans}, H, W), got {tuple(imgs.shape)}"
            )
        H, W = imgs.shape[-2:]
        if H % P or W % P:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {P}")
        return H // P, W // P

    # MAE's split: masking -> forward_encoder -> forward_decoder -> forward_loss.

    def forward_encoder(
        self, imgs: torch.Tensor, is_masked: torch.Tensor, num_masked: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches -> (x (B, Nv, C), visible_idx (B, Nv), masked_idx (B, Nm)).
        ``num_masked`` (optional, known count per image) skips the mask read-back."""
        gh, gw = self._grid(imgs)
        if is_masked.shape != (imgs.shape[0], gh * gw):
            raise ValueError(
                f"is_masked has shape {tuple(is_masked.shape)}, expected "
                f"({imgs.shape[0]}, {gh * gw}) for {tuple(imgs.shape[-2:])} images"
            )
        visible_idx, masked_idx = mask_indices(is_masked, num_masked)
        with record_function("vit/encoder"):
            patches = patchify(imgs, self.patch_size)  # (B, gh*gw, in_chans*P*P)
            C = patches.shape[-1]
            patches = patches.gather(1, visible_idx.unsqueeze(-1).expand(-1, -1, C))  # (B, Nv, .)
            x, _ = self.encoder(patches, visible_idx, gw)
        return x, visible_idx, masked_idx

    def forward_decoder(self, x: torch.Tensor, visible_idx: torch.Tensor,
                        query_idx: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Predict the pixels of patches query_idx (B, Nq) -> (B, Nq, in_chans*P*P)."""
        with record_function("decoder"):
            return self.decoder(x, visible_idx, query_idx, grid_hw)

    def _target(self, imgs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Pixels of patches idx (B, Nq) -> (B, Nq, in_chans*P*P) float32 (per-patch
        normalised when norm_pix_loss)."""
        patches = patchify(imgs.float(), self.patch_size)
        target = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6).sqrt()
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     query_idx: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the predicted patches (float32)."""
        return F.mse_loss(pred.float(), self._target(imgs, query_idx))

    @casts_weights_once
    def forward(self, imgs: torch.Tensor, is_masked: torch.Tensor,
                generator: torch.Generator | None = None,
                num_masked: int | None = None) -> dict[str, torch.Tensor]:
        """imgs (B, in_chans, H, W) normalised, is_masked (B, gh*gw) bool (True = hidden).

        Returns "loss" (= "loss_rec", MSE over the predicted patches), "pred" (B, Nq, in_chans*P*P)
        for the patches "pred_idx" (B, Nq) (raster indices, ascending): every masked patch, or in
        training with pred_ratio < 1 a random round(pred_ratio * Nm) of them (from ``generator``
        or the global RNG). ``num_masked``: the known masked count per image (no host sync).
        """
        grid_hw = self._grid(imgs)
        x, visible_idx, masked_idx = self.forward_encoder(imgs, is_masked, num_masked)
        query_idx = masked_idx
        if self.training and self.config.pred_ratio < 1.0:
            query_idx = sample_queries(masked_idx, self.config.pred_ratio, generator)
        pred = self.forward_decoder(x, visible_idx, query_idx, grid_hw)
        loss = self.forward_loss(imgs, pred, query_idx)
        return {"loss": loss, "loss_rec": loss, "pred": pred, "pred_idx": query_idx}

    def reconstruct(self, imgs: torch.Tensor, is_masked: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W): visible patches from the input, every masked patch predicted.

        With norm_pix_loss the predictions are per-patch normalised; they are mapped back with
        the true patch's mean/std (as MAE's visualisation does), so only texture is predicted.
        """
        gh, gw = self._grid(imgs)
        x, visible_idx, masked_idx = self.forward_encoder(imgs, is_masked)
        pred = self.forward_decoder(x, visible_idx, masked_idx, (gh, gw)).float()
        patches = patchify(imgs.float(), self.patch_size)  # (B, gh*gw, in_chans*P*P)
        idx = masked_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        if self.config.norm_pix_loss:
            true = patches.gather(1, idx)
            pred = pred * (true.var(dim=-1, keepdim=True) + 1.0e-6).sqrt()
            pred = pred + true.mean(dim=-1, keepdim=True)
        out = patches.scatter(1, idx, pred)
        return unpatchify(out, (gh, gw), self.patch_size).to(imgs.dtype)

    # Backbone interface (segmentation fine-tuning): the encoder on every patch, no mask.

    def forward_intermediates(
        self, imgs: torch.Tensor, indices: tuple[int, ...] | None = None, norm: bool = True,
        output_fmt: str = "NLC",
    ) -> list[torch.Tensor]:
        """Outputs of encoder blocks ``indices`` (default: the last block of each quarter of the
        depth, e.g. 1, 3, 5, 7 for depth 8) on the unmasked image.

        Returns one tensor per index: (B, gh*gw, C) in raster order ("NLC") or (B, C, gh, gw)
        ("NCHW"); with ``norm`` each goes through the encoder's final LayerNorm.
        """
        depth = self.config.depth
        if indices is None:
            indices = tuple(sorted({max(0, depth * q // 4 - 1) for q in range(1, 5)}))
        bad = [i for i in indices if not -depth <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for depth {depth}")
        if output_fmt not in ("NLC", "NCHW"):
            raise ValueError(f"output_fmt must be 'NLC' or 'NCHW', got {output_fmt!r}")
        taps = tuple(i % depth for i in indices)
        gh, gw = self._grid(imgs)
        patches = patchify(imgs, self.patch_size)  # (B, gh*gw, in_chans*P*P)
        idx = torch.arange(gh * gw, device=imgs.device).expand(imgs.shape[0], -1)
        _, tapped = self.encoder(patches, idx, gw, taps)
        by_index = dict(zip(sorted(set(taps)), tapped))
        outs = []
        for i in taps:
            y = self.encoder.norm(by_index[i]) if norm else by_index[i]
            if output_fmt == "NCHW":
                y = y.transpose(1, 2).reshape(y.shape[0], -1, gh, gw)  # (B, C, gh, gw)
            outs.append(y)
        return outs

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoding -> (B, gh*gw, C) final (normalised) tokens in raster order."""
        gh, gw = self._grid(imgs)
        patches = patchify(imgs, self.patch_size)
        idx = torch.arange(gh * gw, device=imgs.device).expand(imgs.shape[0], -1)
        return self.encoder(patches, idx, gw)[0]

    # Segmentation interface (``affmae.models.segmentation.Segmenter``).

    def dense_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder, decoder queried at every patch: (B, gh*gw, decoder_dim), raster
        order. (With every patch visible the MAE decoder sees no mask token.)"""
        gh, gw = self._grid(imgs)
        patches = patchify(imgs, self.patch_size)
        idx = torch.arange(gh * gw, device=imgs.device).expand(imgs.shape[0], -1)
        x = self.encoder(patches, idx, gw)[0]
        with record_function("decoder"):
            return self.decoder.features(x, idx, idx, (gh, gw))

    def strip_pretraining_heads(self) -> None:
        """Drop the pixel head (unused in fine-tuning; DDP would see unused parameters)."""
        del self.decoder.head

    @property
    def num_layers(self) -> int:
        return self.config.depth

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay depth: 0 patch embedding, 1..depth encoder blocks (the final
        encoder norm counts with the last block), depth + 1 decoder and head."""
        if name.startswith("encoder.patch_embed"):
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith("encoder.norm"):
            return self.config.depth
        return self.config.depth + 1

    def no_weight_decay(self) -> set[str]:
        """The learned mask token (like AFF's blank tokens) is exempt; so is every ndim <= 1
        parameter, by the package's rule."""
        return {"decoder.mask_token"}


# ---------------------------------------------------------------------------------------------
# Registered sizes
# ---------------------------------------------------------------------------------------------

_SMALL = ViTMAEConfig()  # ViT-S/8 + MAE decoder 384/4/6 (DESIGN 4)
_TINY = ViTMAEConfig(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, decoder_dim=64,
                     decoder_depth=1, decoder_heads=2, decoder_mlp_ratio=2.0)
# CrossMAE variants reconstruct half of the masked patches: a quarter of all patches at the
# default mask ratio 0.5, the setting of DESIGN 6's reference numbers.
_CROSS = {"decoder": "cross", "pred_ratio": 0.5}


@register_model("vit_small")
def vit_small(**overrides) -> ViTMAE:
    """ViT-S/8 MAE (about 21.5M parameters with its decoder)."""
    return ViTMAE(replace_config(_SMALL, overrides))


@register_model("vit_small_crossmae")
def vit_small_crossmae(**overrides) -> ViTMAE:
    """ViT-S/8 with a CrossMAE decoder (384, depth 4, 6 heads), pred_ratio 0.5."""
    return ViTMAE(replace_config(replace_config(_SMALL, _CROSS), overrides))


@register_model("vit_tiny")
def vit_tiny(**overrides) -> ViTMAE:
    """Tiny ViT MAE for tests and CPU demos (width 64, depth 2)."""
    return ViTMAE(replace_config(_TINY, overrides))


@register_model("vit_tiny_crossmae")
def vit_tiny_crossmae(**overrides) -> ViTMAE:
    """Tiny ViT with a CrossMAE decoder, pred_ratio 0.5."""
    return ViTMAE(replace_config(replace_config(_TINY, _CROSS), overrides))
