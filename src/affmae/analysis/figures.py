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
Figures that need a model (PCA, token maps, reconstructions) live elsewhere once the model exists.
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

__all__ = ["mask_spectra_figure", "plot_mask_examples", "plot_spectra"]

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
