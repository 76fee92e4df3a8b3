"""Figures of the masking analysis: mask spectra (paper Fig. 7) and mask illustrations (Fig. 6).

Every function writes one PNG (parent folders created) and returns its path. Figures are built
with matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg), never ``pyplot``:
no global backend switch, no open-figure leaks, safe on headless machines.

``mask_spectra_figure`` needs no checkpoint: it draws ``n`` uniform and ``n`` Perlin masks with
``affmae.ops.masking.make_mask``, upsamples them to pixels (each patch -> P x P pixels), and
compares their radial PSDs with those of the given images (``affmae.analysis.spectrum``).
Deliberate choices: images are min-max rescaled to [0, 1] per image, like the 0/1 masks, so
the curves' magnitudes compare (the paper does not say how it scaled them). Slopes are fitted
over the whole band and, separately, below the patch-grid Nyquist frequency 1 / (2P): above it an
upsampled mask's spectrum is dominated by the sinc lobes of the P x P patch box, whatever the mask.

Figures of what a model learned take plain arrays (no model here; ``affmae.analysis.model_figures``
runs the model): ``plot_effective_rank`` (Fig. 5), ``plot_feature_pca`` (Fig. 4),
``plot_token_maps`` (Fig. 3) and ``plot_reconstructions`` (Fig. 8). Grey images are shown with
their own 1st-99th percentile range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from affmae.analysis.spectrum import radial_psd, spectral_slope
from affmae.ops.masking import DEFAULT_PERLIN_SCALES, make_mask

__all__ = [
    "mask_spectra_figure",
    "plot_effective_rank",
    "plot_feature_pca",
    "plot_mask_examples",
    "plot_reconstructions",
    "plot_spectra",
    "plot_token_maps",
]

_DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def plot_spectra(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str | None = "Radially averaged power spectrum",
) -> Path:
    """Log-log plot of radial PSDs (Fig. 7); each legend entry carries its fitted slope.

    Args:
        curves: name -> (freqs, psd) as returned by ``radial_psd``.
        path: PNG file to write.
    """
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, (freqs, psd) in curves.items():
        f = _numpy(freqs).ravel()
        p = _numpy(psd).ravel()
        if f.shape != p.shape:
            raise ValueError(f"curve {name!r}: freqs and psd differ in length: {f.shape} vs {p.shape}")
        use = (f > 0) & (p > 0)
        slope = spectral_slope(f, p)
        ax.loglog(f[use], p[use], label=f"{name} (slope {slope:.2f})")
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("power")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_mask_examples(
    masks,
    path: str | Path,
    images=None,
    patch_size: int = 8,
    titles: Sequence[str] | None = None,
) -> Path:
    """Grid of masks (Fig. 6); hidden patches drawn dark, over the images when given.

    Args:
        masks: (n, gh, gw) bool, True = hidden.
        path: PNG file to write.
        images: optional (n, gh * P, gw * P) grey images; masked patches are dimmed and tinted.
        patch_size: P, pixels per patch side (only used to upsample masks onto images).
        titles: optional n panel titles.
    """
    m = _numpy(masks).astype(bool)
    if m.ndim != 3 or m.shape[0] < 1:
        raise ValueError(f"masks must be (n, gh, gw), got shape {m.shape}")
    n, gh, gw = m.shape
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} masks")
    imgs = None
    if images is not None:
        imgs = _numpy(images).astype(np.float64)
        want = (n, gh * patch_size, gw * patch_size)
        if imgs.shape != want:
            raise ValueError(
                f"images must be (n, gh*P, gw*P) = {want} for masks {m.shape} and "
                f"patch_size={patch_size}, got {imgs.shape}"
            )
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    panel = 3.0
    aspect = gh / gw
    fig = Figure(figsize=(panel * ncols, panel * aspect * nrows + 0.4 * nrows))
    for i in range(n):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if imgs is None:
            # Visible = white, hidden = black, one cell per patch.
            ax.imshow(~m[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            img = imgs[i]
            lo, hi = np.percentile(img, [1, 99])
            img = np.clip((img - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
            hidden = np.kron(m[i], np.ones((patch_size, patch_size), dtype=bool))  # (H, W)
            rgb = np.repeat(img[..., None], 3, axis=-1)  # (H, W, 3)
            tint = np.array([0.85, 0.25, 0.2])
            rgb[hidden] = 0.35 * rgb[hidden] + 0.65 * tint
            ax.imshow(rgb, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[i] if titles is not None else f"{m[i].mean():.2f} hidden", fontsize=9)
    return _save(fig, path)


def mask_spectra_figure(
    images,
    grid_hw: Sequence[int],
    patch_size: int,
    out_dir: str | Path,
    ratio: float = 0.5,
    n: int = 64,
    seed: int = 0,
    scales: Sequence[float] = DEFAULT_PERLIN_SCALES,
) -> dict:
    """Spectra of images vs uniform vs Perlin masks (Fig. 7) and a mask illustration (Fig. 6).

    Args:
        images: (B, gh * P, gw * P) grey images, or None (masks only).
        grid_hw: (gh, gw) patch grid of the masks.
        patch_size: P; masks are upsampled to (gh * P, gw * P) pixels before the DFT.
        out_dir: folder for ``mask_spectra.png`` and ``mask_examples.png``.
        ratio: masking ratio of both mask kinds.
        n: masks of each kind to average.
        seed: seeds a CPU ``torch.Generator``; the same seed gives the same figure and numbers.
        scales: Perlin scales (see ``affmae.ops.masking.perlin_noise``).
    Returns:
        JSON-ready dict: settings; "slopes" (whole band) and "slopes_below_patch_nyquist"
        (f <= 1 / (2P)), each {"images", "uniform_masks", "perlin_masks"} with "images" None
        when no images are given; and the written file paths under "files".
    """
    gh, gw = (int(g) for g in grid_hw)
    P = int(patch_size)
    if P < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    if int(n) < 1:
        raise ValueError(f"n must be a positive number of masks, got {n!r}")
    H, W = gh * P, gw * P
    imgs = None
    if images is not None:
        imgs = torch.as_tensor(_numpy(images), dtype=torch.float64)
        if imgs.dim() != 3 or tuple(imgs.shape[1:]) != (H, W) or imgs.shape[0] < 1:
            raise ValueError(
                f"images must be (B, {H}, {W}) for grid_hw={(gh, gw)} and patch_size={P}, "
                f"got shape {tuple(imgs.shape)}"
            )
        # Per-image min-max to [0, 1], the range of the masks (constant images stay 0).
        lo = imgs.amin(dim=(1, 2), keepdim=True)
        hi = imgs.amax(dim=(1, 2), keepdim=True)
        imgs = (imgs - lo) / (hi - lo).clamp_min(1e-12)
    out_dir = Path(out_dir)

    # 1. Masks of both kinds from one seeded generator, upsampled to pixels.
    gen = torch.Generator().manual_seed(int(seed))
    masks = {
        "Perlin masks": make_mask(n, (gh, gw), ratio, "perlin", scales, generator=gen),
        "Random masks": make_mask(n, (gh, gw), ratio, "uniform", generator=gen),
    }
    masks = {k: v.view(n, gh, gw) for k, v in masks.items()}  # (n, gh, gw)
    curves = {}
    if imgs is not None:
        curves["Images"] = radial_psd(imgs)
    for name, m in masks.items():
        pixels = m.repeat_interleave(P, dim=1).repeat_interleave(P, dim=2)  # (n, H, W)
        curves[name] = radial_psd(pixels.to(torch.float32))

    # 2. Figures: the spectra, and four masks of each kind (over the first images if given).
    spectra_path = plot_spectra(curves, out_dir / "mask_spectra.png")
    k = min(4, n)
    shown = torch.cat([masks["Perlin masks"][:k], masks["Random masks"][:k]])  # (2k, gh, gw)
    titles = [f"Perlin, r={ratio}"] * k + [f"random, r={ratio}"] * k
    shown_imgs = None
    if imgs is not None:
        pick = torch.arange(k) % imgs.shape[0]
        shown_imgs = torch.cat([imgs[pick], imgs[pick]])  # (2k, H, W)
    examples_path = plot_mask_examples(
        shown, out_dir / "mask_examples.png", images=shown_imgs, patch_size=P, titles=titles
    )

    # 3. Numbers for the JSON: slopes over the whole band and below the patch-grid Nyquist.
    band = 1.0 / (2 * P)
    keys = {"Images": "images", "Random masks": "uniform_masks", "Perlin masks": "perlin_masks"}
    slopes = {keys[name]: spectral_slope(*curve) for name, curve in curves.items()}
    slopes_band = {}
    for name, (freqs, psd) in curves.items():
        # None when the grid is too small to leave two bins below 1 / (2P).
        enough = int(((freqs <= band) & (psd > 0)).sum()) >= 2
        slopes_band[keys[name]] = spectral_slope(freqs, psd, fmax=band) if enough else None
    return {
        "grid_hw": [gh, gw],
        "patch_size": P,
        "ratio": float(ratio),
        "n_masks": int(n),
        "n_images": 0 if imgs is None else int(imgs.shape[0]),
        "seed": int(seed),
        "perlin_scales": [float(s) for s in scales],
        "slopes": {"images": None, **slopes},
        "patch_nyquist": band,
        "slopes_below_patch_nyquist": {"images": None, **slopes_band},
        "files": {"spectra": str(spectra_path), "mask_examples": str(examples_path)},
    }


# ---------------------------------------------------------------------------------------------
# Figures of a model (arrays in, PNG out)
# ---------------------------------------------------------------------------------------------

_PANEL = 2.6  # inches per image panel
_HIDDEN_TINT = np.array([0.85, 0.25, 0.2])  # colour of hidden patches over an image


def _grey(img: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """Grey image -> [0, 1] by the 1st-99th percentile of ``ref`` (default: the image)."""
    lo, hi = np.percentile(img if ref is None else ref, [1, 99])
    return np.clip((img - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def _images(images, what: str = "images") -> np.ndarray:
    imgs = _numpy(images).astype(np.float64)
    if imgs.ndim != 3 or imgs.shape[0] < 1:
        raise ValueError(f"{what} must be (n, H, W), got shape {imgs.shape}")
    return imgs


def _check_hidden(hidden, n: int, H: int, W: int, patch_size: int) -> np.ndarray:
    m = _numpy(hidden).astype(bool)
    want = (n, H // patch_size, W // patch_size)
    if m.shape != want or H % patch_size or W % patch_size:
        raise ValueError(
            f"hidden must be (n, H/P, W/P) = {want} for images (n={n}, {H}x{W}) and "
            f"patch_size={patch_size}, got {m.shape}"
        )
    return m


def _tinted(img01: np.ndarray, hidden_px: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) RGB with hidden pixels dimmed and tinted."""
    rgb = np.repeat(img01[..., None], 3, axis=-1)  # (H, W, 3)
    rgb[hidden_px] = 0.35 * rgb[hidden_px] + 0.65 * _HIDDEN_TINT
    return rgb


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_effective_rank(
    curves: Mapping[str, Sequence[float | None]],
    labels: Sequence[str],
    path: str | Path,
    title: str | None = "Normalised effective rank of encoder tokens",
    reference: float | None = 0.7,
) -> Path:
    """Normalised effective rank per encoder stage or block (Fig. 5).

    Args:
        curves: name -> one value per entry of ``labels`` (None = not measured, left out).
        labels: x-axis tick labels, e.g. ["stage 1", ..., "stage 4"].
        reference: dashed horizontal line (the paper's R > 0.7 with deep supervision); None: none.
    """
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    n = len(labels)
    fig = Figure(figsize=(max(4.5, 1.1 * n + 2.0), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for k, (name, values) in enumerate(curves.items()):
        if len(values) != n:
            raise ValueError(f"curve {name!r} has {len(values)} values for {n} labels")
        xs = [i for i, v in enumerate(values) if v is not None]
        ys = [float(values[i]) for i in xs]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y in zip(xs, ys):
            # Alternate labels above / below the points so two close curves stay readable.
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points",
                        xytext=(0, 6 if k % 2 == 0 else -13), ha="center", fontsize=8,
                        color=ax.lines[-1].get_color())
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=1, label=f"R = {reference}")
    ax.set_xticks(range(n))
    ax.set_xticklabels(list(labels))
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel("normalised effective rank R (eq. 3)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_feature_pca(
    images,
    maps: Sequence,
    labels: Sequence[str],
    path: str | Path,
    explained: Sequence[Sequence[float]] | None = None,
    title: str | None = None,
) -> Path:
    """Rows: images; columns: the image, then one PCA-RGB feature map per layer (Fig. 4).

    Args:
        images: (n, H, W) grey images.
        maps: per layer an (n, gh, gw, 3) RGB array in [0, 1] (``affmae.analysis.pca.pca_rgb``).
        labels: one column title per layer.
        explained: optional per layer the variance fractions of the three components.
    """
    imgs = _images(images)
    n, H, W = imgs.shape
    if len(maps) != len(labels) or not maps:
        raise ValueError(f"got {len(maps)} maps for {len(labels)} labels (need >= 1 of each)")
    if explained is not None and len(explained) != len(maps):
        raise ValueError(f"got {len(explained)} explained-variance entries for {len(maps)} maps")
    rgbs = [_numpy(m).astype(np.float64) for m in maps]
    for label, m in zip(labels, rgbs):
        if m.ndim != 4 or m.shape[0] != n or m.shape[-1] != 3:
            raise ValueError(f"map {label!r} must be (n={n}, gh, gw, 3), got {m.shape}")
    ncols = 1 + len(rgbs)
    aspect = H / W
    fig = Figure(figsize=(_PANEL * ncols, _PANEL * aspect * n + 0.6))
    extent = (-0.5, W - 0.5, H - 0.5, -0.5)  # feature cells cover their patches' pixels
    for i in range(n):
        ax = fig.add_subplot(n, ncols, i * ncols + 1)
        ax.imshow(_grey(imgs[i]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        _off(ax)
        if i == 0:
            ax.set_title("image", fontsize=9)
        for j, (label, m) in enumerate(zip(labels, rgbs)):
            ax = fig.add_subplot(n, ncols, i * ncols + j + 2)
            ax.imshow(m[i], extent=extent, interpolation="nearest")
            _off(ax)
            if i == 0:
                t = label
                if explained is not None:
                    t += "\nPC1-3: " + "/".join(f"{100 * v:.0f}" for v in explained[j]) + "% var"
                ax.set_title(t, fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_token_maps(
    images,
    positions: Sequence,
    patch_size: int,
    path: str | Path,
    hidden=None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Token positions of every encoder stage over the image (Fig. 3); rows: images.

    Args:
        images: (n, H, W) grey images.
        positions: per stage an (n, N_s, 2) array of (x, y) token positions in patch units.
        patch_size: P; a token at (x, y) is drawn at the centre of patch (x, y).
        hidden: optional (n, H/P, W/P) bool, patches hidden from the encoder (tinted).
        labels: optional column titles (default "stage s"); each gets the token count.
    """
    imgs = _images(images)
    n, H, W = imgs.shape
    P = int(patch_size)
    pos = [_numpy(p).astype(np.float64) for p in positions]
    if not pos:
        raise ValueError("positions is empty: nothing to plot")
    for s, p in enumerate(pos):
        if p.ndim != 3 or p.shape[0] != n or p.shape[-1] != 2:
            raise ValueError(f"positions of stage {s + 1} must be (n={n}, N, 2), got {p.shape}")
    if labels is None:
        labels = [f"stage {s + 1}" for s in range(len(pos))]
    if len(labels) != len(pos):
        raise ValueError(f"got {len(labels)} labels for {len(pos)} stages")
    m = None if hidden is None else _check_hidden(hidden, n, H, W, P)
    gh, gw = H // P, W // P
    ncols = len(pos)
    aspect = H / W
    fig = Figure(figsize=(_PANEL * ncols, _PANEL * aspect * n + 0.6))
    # Marker area ~ a third of a patch cell (points^2), readable from 8x8 to 128x128 grids.
    cell_pt = 72.0 * _PANEL / gw
    size = float(np.clip((0.55 * cell_pt) ** 2, 0.3, 40.0))
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i in range(n):
        base = _grey(imgs[i])
        rgb = np.repeat(base[..., None], 3, axis=-1)
        if m is not None:
            rgb = _tinted(base, np.kron(m[i], np.ones((P, P), dtype=bool)))
        for s, p in enumerate(pos):
            ax = fig.add_subplot(n, ncols, i * ncols + s + 1)
            ax.imshow(rgb, interpolation="nearest")
            px = (p[i] + 0.5) * P - 0.5  # (N, 2) pixel coordinates of the patch centres
            ax.scatter(px[:, 0], px[:, 1], s=size, c=colours[s % len(colours)],
                       edgecolors="white", linewidths=0.2)
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
            _off(ax)
            if i == 0:
                N = p.shape[1]
                ax.set_title(f"{labels[s]}: {N} tokens\n({N / (gh * gw):.1%} of {gh}x{gw} patches)",
                             fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_reconstructions(
    images,
    hidden,
    recon,
    patch_size: int,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Rows: image / masked input / reconstruction; columns: images (Fig. 8).

    Args:
        images, recon: (n, H, W) grey images (same units; each column uses the image's range).
        hidden: (n, H/P, W/P) bool, True = hidden patch.
        patch_size: P.
    """
    imgs = _images(images)
    rec = _images(recon, "recon")
    if rec.shape != imgs.shape:
        raise ValueError(f"recon shape {rec.shape} differs from images {imgs.shape}")
    n, H, W = imgs.shape
    P = int(patch_size)
    m = _check_hidden(hidden, n, H, W, P)
    fig = Figure(figsize=(_PANEL * n, _PANEL * (H / W) * 3 + 0.6))
    rows = ("image", "masked input", "reconstruction")
    for i in range(n):
        hidden_px = np.kron(m[i], np.ones((P, P), dtype=bool))  # (H, W)
        panels = (_grey(imgs[i]), _tinted(_grey(imgs[i]), hidden_px), _grey(rec[i], ref=imgs[i]))
        for r, panel in enumerate(panels):
            ax = fig.add_subplot(3, n, r * n + i + 1)
            ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            _off(ax)
            if i == 0:
                ax.set_ylabel(rows[r], fontsize=9)
            if r == 1:
                ax.set_title(f"{m[i].mean():.0%} hidden", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
