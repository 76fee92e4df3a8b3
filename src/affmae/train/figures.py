"""Reconstruction figure for MAE training: image | masked input | reconstruction.

Uses matplotlib's Agg backend (no display needed). Images are shown in dataset units (the
normalisation is undone with the dataset mean/std), each row with the original image's grey
range so that the three panels of a row are comparable.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def mask_to_pixels(is_masked: torch.Tensor, grid_hw: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, gh*gw) bool -> (B, 1, gh*P, gw*P) bool, True on pixels of hidden patches."""
    b = is_masked.shape[0]
    m = is_masked.reshape(b, 1, *grid_hw)  # (B, 1, gh, gw)
    return m.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


def save_reconstruction_figure(path: str | Path, images: torch.Tensor, is_masked: torch.Tensor,
                               recon: torch.Tensor, patch: int, mean: float, std: float,
                               title: str | None = None) -> None:
    """Write a PNG with one row per image: original, masked input, reconstruction.

    Args:
        images: (B, 1, H, W) normalised inputs.
        is_masked: (B, gh*gw) bool, True = hidden.
        recon: (B, 1, H, W) normalised ``model.reconstruct`` output.
        patch: patch size P (H, W multiples of it).
        mean, std: dataset statistics used for the normalisation.
    """
    images = images.detach().float().cpu() * std + mean
    recon = recon.detach().float().cpu() * std + mean
    b, _, h, w = images.shape
    hidden = mask_to_pixels(is_masked.cpu(), (h // patch, w // patch), patch)
    fig, axes = plt.subplots(b, 3, figsize=(9, 3 * b * h / w), squeeze=False)
    for i in range(b):
        lo, hi = images[i].min().item(), images[i].max().item()
        masked = images[i].clone()
        masked[hidden[i]] = float("nan")  # hidden patches drawn in the "bad" colour
        cmap = plt.get_cmap("gray").with_extremes(bad=(0.55, 0.1, 0.1))
        for ax, img, name in zip(axes[i], (images[i], masked, recon[i]),
                                 ("image", f"masked ({is_masked[i].float().mean():.0%})",
                                  "reconstruction")):
            ax.imshow(img[0].numpy(), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
