"""Run a pretrained MAE and draw what it learned: paper Figs. 3, 4, 5 and 8 (sec. 3.3, 4).

``analyze_model`` takes a model (``AFFMAE`` or ``ViTMAE``) and a batch of dataset-normalised
images and writes, under ``out_dir``:

1. ``effective_rank.png`` (Fig. 5): normalised effective rank (eq. 3) of each encoder stage's
   tokens, the tokens of all images pooled per stage as (sum of N, C); once with the full image
   (unmasked) and once under the pretraining mask. ViT: the last block of each quarter of the
   depth (``forward_intermediates``' default blocks), through the encoder's final LayerNorm.
2. ``pca.png`` (Fig. 4): first three principal components as RGB on the (gh, gw) patch grid.
   AFF: the unmasked encoder, the decoder queried at every patch (as ``AFFMAE.dense_features``),
   the decoder features after each stage's block(s), coarse to fine (each block is self-attn,
   cross-attn into that stage, FFN: "after the cross-attention" here includes the block's FFN).
   ViT: the encoder's quarter-depth blocks and the decoder output (it has no per-stage decoder).
3. ``token_maps_unmasked.png`` / ``token_maps_masked.png`` (Fig. 3, AFF only): the token
   positions each stage keeps, over the image (masked patches tinted in the masked case).
4. ``recon_<kind>_r<ratio>.png`` (Fig. 8): image / masked input / reconstruction for each mask
   kind and ratio, plus the MSE on the masked patches (normalised units) over all images.

Deliberate choices:
    * Ranks use the uncentred token matrix (eq. 3 as written); centred ranks are stored beside
      them (``*_centered``), since a shared offset direction alone can lower R.
    * PCA is fitted jointly over the shown images of one layer (``affmae.analysis.pca``).
    * Every mask comes from a CPU ``torch.Generator`` seeded from (seed, purpose), so numbers and
      figures depend only on the model, the images and ``seed``; the masked rank and the masked
      token maps share one mask per image, each reconstruction setting has its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from affmae.analysis.figures import (plot_effective_rank, plot_feature_pca, plot_reconstructions,
                                     plot_token_maps)
from affmae.analysis.pca import pca_rgb
from affmae.analysis.rank import effective_rank
from affmae.ops.masking import DEFAULT_PERLIN_SCALES, make_mask, mask_indices
from affmae.ops.patches import grid_positions, patchify

__all__ = [
    "analyze_model",
    "dense_feature_maps",
    "encoder_tokens",
    "model_family",
    "seeded_generator",
]

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_family(model: nn.Module) -> str:
    """"aff" (AFFMAE) or "vit" (ViTMAE); anything else is an error naming its type."""
    from affmae.models.mae import AFFMAE
    from affmae.models.vit import ViTMAE

    if isinstance(model, AFFMAE):
        return "aff"
    if isinstance(model, ViTMAE):
        return "vit"
    raise ValueError(
        f"analyze needs a pretrained MAE (AFFMAE or ViTMAE), got {type(model).__name__} "
        f"({getattr(model, 'model_name', 'unnamed')}); fine-tuned segmentation checkpoints have "
        "no reconstruction head"
    )


def seeded_generator(seed: int, purpose: int) -> torch.Generator:
    """CPU generator for one purpose (0: analysis mask, 1..: reconstruction settings)."""
    state = np.random.SeedSequence([int(seed), int(purpose)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _grid(model: nn.Module, imgs: torch.Tensor) -> tuple[int, int]:
    P = model.patch_size
    H, W = imgs.shape[-2:]
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not a multiple of the model's patch size {P}")
    return H // P, W // P


def _vit_taps(model: nn.Module) -> tuple[int, ...]:
    # forward_intermediates' default blocks: the last of each quarter of the depth.
    depth = model.config.depth
    return tuple(sorted({max(0, depth * q // 4 - 1) for q in range(1, 5)}))


@torch.no_grad()
def encoder_tokens(
    model: nn.Module, imgs: torch.Tensor, is_masked: torch.Tensor | None = None
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Encoder tokens of every stage (AFF) or quarter-depth block (ViT).

    Args:
        imgs: (B, 1, H, W) normalised images on the model's device.
        is_masked: optional (B, gh*gw) bool; None = every patch visible.
    Returns:
        (labels, tokens, positions): per stage/block a label, the (B, N, C) tokens and their
        (B, N, 2) (x, y) positions in patch units.
    """
    family = model_family(model)
    gh, gw = _grid(model, imgs)
    B = imgs.shape[0]
    if is_masked is None:
        visible_idx = torch.arange(gh * gw, device=imgs.device).expand(B, -1)
    else:
        visible_idx, _ = mask_indices(is_masked)
    if family == "aff":
        stages = model.forward_encoder(imgs, visible_idx)
        labels = [f"stage {s + 1}" for s in range(len(stages))]
        return labels, [st.x for st in stages], [st.pos for st in stages]
    taps = _vit_taps(model)
    pos = grid_positions(visible_idx, gw)  # (B, Nv, 2)
    if is_masked is None:
        tokens = model.forward_intermediates(imgs, indices=taps)
    else:
        patches = patchify(imgs, model.patch_size)  # (B, gh*gw, P*P)
        idx = visible_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        _, tapped = model.encoder(patches.gather(1, idx), visible_idx, gw, taps)
        tokens = [model.encoder.norm(t) for t in tapped]  # as forward_intermediates(norm=True)
    return [f"block {t + 1}" for t in taps], list(tokens), [pos] * len(taps)


@torch.no_grad()
def dense_feature_maps(
    model: nn.Module, imgs: torch.Tensor
) -> tuple[list[str], list[torch.Tensor]]:
    """Features on the patch grid, unmasked: (labels, list of (B, gh, gw, C)).

    AFF: the decoder queried at every patch, after each stage's blocks, coarse to fine.
    ViT: encoder quarter-depth blocks, then the decoder output.
    """
    family = model_family(model)
    gh, gw = _grid(model, imgs)
    B = imgs.shape[0]
    if family == "aff":
        # As in fine-tuning (queries start from their own tokens), after each cross-attention.
        feats = model.dense_decoder_features(imgs, after="cross")  # raster order
        S = len(feats)
        labels = [f"decoder, stage {S - i} cross-attention" for i in range(len(feats))]
    else:
        taps = _vit_taps(model)
        feats = list(model.forward_intermediates(imgs, indices=taps)) + [model.dense_features(imgs)]
        labels = [f"encoder block {t + 1}" for t in taps] + ["decoder output"]
    return labels, [f.reshape(B, gh, gw, f.shape[-1]) for f in feats]  # (B, gh, gw, C)


def _autocast(device: torch.device, precision: str):
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {tuple(DTYPES)}, got {precision!r}")
    dtype = DTYPES[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _fmt_ratio(r: float) -> str:
    return f"{r:.2f}"


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    images: torch.Tensor,
    out_dir: str | Path,
    mean: float,
    std: float,
    mask_ratio: float = 0.5,
    mask_kind: str = "perlin",
    perlin_scales: Sequence[float] = DEFAULT_PERLIN_SCALES,
    recon_ratios: Sequence[float] = (0.5, 0.75),
    recon_kinds: Sequence[str] = ("perlin", "uniform"),
    show: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Figures 3, 4, 5, 8 and their numbers for one model (see module docstring).

    Args:
        model: AFFMAE or ViTMAE (put in eval mode and moved to ``device`` here).
        images: (B, 1, H, W) images normalised with (mean, std), on the CPU.
        out_dir: folder for the PNGs.
        mean, std: the normalisation, undone for display.
        mask_ratio, mask_kind, perlin_scales: the pretraining mask (masked ranks, token maps).
        recon_ratios, recon_kinds: reconstruction settings (every kind x every ratio).
        show: images drawn in each figure (the first ``show``).
        batch_size: images per forward pass. seed: seeds every mask.
        precision: "fp32" | "bf16" | "fp16" (autocast). log: progress messages.
    Returns:
        JSON-ready dict: "effective_rank", "pca", "token_maps" (AFF only), "reconstruction",
        "files" (name -> path), "skipped" (part -> reason).
    """
    family = model_family(model)
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[0] < 1:
        raise ValueError(f"images must be (B, 1, H, W) with B >= 1, got {tuple(images.shape)}")
    if batch_size < 1 or show < 1:
        raise ValueError(f"batch_size and show must be >= 1, got {batch_size} and {show}")
    device = torch.device(device)
    out_dir = Path(out_dir)
    model = model.to(device).eval()
    B = images.shape[0]
    gh, gw = _grid(model, images)
    P = model.patch_size
    n_show = min(show, B)
    files: dict[str, str] = {}
    skipped: dict[str, str] = {}
    raw = (images[:, 0].float() * std + mean).numpy()  # (B, H, W) dataset units, for display

    def batches():
        for start in range(0, B, batch_size):
            yield start, images[start : start + batch_size].to(device)

    # 1. Encoder tokens, unmasked and under the pretraining mask (one mask per image).
    is_masked = make_mask(B, (gh, gw), mask_ratio, mask_kind, perlin_scales,
                          generator=seeded_generator(seed, 0))  # (B, gh*gw)
    pooled: dict[str, list[list[torch.Tensor]]] = {"unmasked": [], "masked": []}
    shown_pos: dict[str, list[list[torch.Tensor]]] = {"unmasked": [], "masked": []}
    tokens_per_image: dict[str, list[int]] = {}
    labels: list[str] = []
    for mode in ("unmasked", "masked"):
        log(f"encoder tokens ({mode}) of {B} images")
        for start, x in batches():
            mask = None if mode == "unmasked" else is_masked[start : start + x.shape[0]].to(device)
            with _autocast(device, precision):
                labels, toks, pos = encoder_tokens(model, x, mask)
            if not pooled[mode]:
                pooled[mode] = [[] for _ in toks]
                shown_pos[mode] = [[] for _ in toks]
                tokens_per_image[mode] = [int(t.shape[1]) for t in toks]
            for s, (t, p) in enumerate(zip(toks, pos)):
                pooled[mode][s].append(t.float().cpu().reshape(-1, t.shape[-1]))  # (b*N, C)
                if start < n_show:
                    shown_pos[mode][s].append(p[: n_show - start].float().cpu())
    log("effective ranks")
    ranks: dict = {"layers": labels, "num_images": B,
                   "mask": {"kind": mask_kind, "ratio": float(mask_ratio),
                            "perlin_scales": [float(s) for s in perlin_scales]},
                   "tokens_per_image": tokens_per_image,
                   "dims": [int(t[0].shape[-1]) for t in pooled["unmasked"]]}
    for mode in ("unmasked", "masked"):
        stacked = [torch.cat(chunks) for chunks in pooled[mode]]  # per stage (sum N, C)
        ranks[f"tokens_pooled_{mode}"] = [int(t.shape[0]) for t in stacked]  # N of eq. 3
        ranks[mode] = [effective_rank(t) for t in stacked]
        ranks[f"{mode}_centered"] = [effective_rank(t, center=True) for t in stacked]
    del pooled
    mask_name = f"{mask_kind} r={mask_ratio:g}"
    files["effective_rank"] = str(plot_effective_rank(
        {"unmasked": ranks["unmasked"], f"masked ({mask_name})": ranks["masked"]}, labels,
        out_dir / "effective_rank.png",
        title=f"Normalised effective rank, {getattr(model, 'model_name', family)}, {B} images"))

    # 2. PCA of dense features on the grid (the shown images only).
    log(f"dense features and PCA of {n_show} images")
    maps: list[list[torch.Tensor]] = []
    pca_labels: list[str] = []
    with _autocast(device, precision):
        for start in range(0, n_show, batch_size):
            x = images[start : min(n_show, start + batch_size)].to(device)
            pca_labels, feats = dense_feature_maps(model, x)
            if not maps:
                maps = [[] for _ in feats]
            for s, f in enumerate(feats):
                maps[s].append(f.float().cpu())
    grids = [torch.cat(m) for m in maps]  # per layer (n_show, gh, gw, C)
    rgbs, explained = zip(*(pca_rgb(g) for g in grids))
    pca = {"layers": pca_labels, "num_images": n_show,
           "explained_variance_top3": [[float(v) for v in e] for e in explained],
           "effective_rank": [effective_rank(g.reshape(-1, g.shape[-1])) for g in grids]}
    files["pca"] = str(plot_feature_pca(
        raw[:n_show], list(rgbs), pca_labels, out_dir / "pca.png", explained=list(explained),
        title="PCA of features on the patch grid (first 3 components as RGB)"))

    # 3. Token maps (AFF: adaptive positions; a ViT keeps every visible patch at every block).
    token_maps = None
    if family == "aff":
        log("token maps")
        token_maps = {}
        hidden = is_masked[:n_show].view(n_show, gh, gw).numpy()
        for mode in ("unmasked", "masked"):
            pos = [torch.cat(p).numpy() for p in shown_pos[mode]]  # per stage (n_show, N, 2)
            path = plot_token_maps(
                raw[:n_show], pos, P, out_dir / f"token_maps_{mode}.png",
                hidden=hidden if mode == "masked" else None,
                title=f"Tokens kept by each stage ({mode if mode == 'unmasked' else mask_name})")
            files[f"token_maps_{mode}"] = str(path)
            token_maps[mode] = {"tokens_per_image": tokens_per_image[mode],
                                "fraction_of_grid": [n / (gh * gw) for n in tokens_per_image[mode]]}
    else:
        skipped["token_maps"] = "ViT keeps every visible patch at every block (no adaptive tokens)"

    # 4. Reconstructions for every mask kind x ratio.
    recon_rows = []
    for k, (kind, ratio) in enumerate(itertools.product(recon_kinds, recon_ratios), start=1):
        log(f"reconstruction: {kind} masks, ratio {ratio:g}")
        masks = make_mask(B, (gh, gw), ratio, kind, perlin_scales,
                          generator=seeded_generator(seed, k))  # (B, gh*gw)
        sq_err, count, shown = 0.0, 0, []
        for start, x in batches():
            m = masks[start : start + x.shape[0]].to(device)
            with _autocast(device, precision):
                rec = model.reconstruct(x, m)
            rec = rec.float()
            hidden_px = m.view(-1, 1, gh, 1, gw, 1).expand(-1, 1, gh, P, gw, P)
            hidden_px = hidden_px.reshape(x.shape)  # (b, 1, H, W)
            diff = (rec - x.float())[hidden_px]
            sq_err += float((diff.double() ** 2).sum())
            count += int(diff.numel())
            if start < n_show:
                shown.append(rec[: n_show - start, 0].cpu())
        rec_raw = (torch.cat(shown) * std + mean).numpy()
        name = f"recon_{kind}_r{_fmt_ratio(ratio)}"
        path = plot_reconstructions(
            raw[:n_show], masks[:n_show].view(n_show, gh, gw).numpy(), rec_raw, P,
            out_dir / f"{name}.png", title=f"{kind} masking, ratio {ratio:g}")
        files[name] = str(path)
        recon_rows.append({"kind": kind, "ratio": float(ratio),
                           "mse_masked": sq_err / count if count else None,
                           "file": str(path)})

    return {"effective_rank": ranks, "pca": pca, "token_maps": token_maps,
            "reconstruction": recon_rows, "files": files, "skipped": skipped}
