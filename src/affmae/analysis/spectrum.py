"""Radially averaged power spectra of images and masks (paper 3.4, eq. 4; Fig. 7).

For each image M (binary mask or grey image) of a batch:
    1. subtract its mean (the DC term would dwarf every other bin);
    2. P(u, v) = |DFT2(M)|^2 / (H * W);
    3. average P over the batch, then over each ring of frequencies whose radius rounds to the same
       integer bin k, giving PSD(f_k) with f_k = k / max(H, W) cycles/pixel (eq. 4).

Deliberate choices the paper leaves open:
    * P is divided by H * W, so white noise of variance s^2 has a flat PSD equal to s^2 whatever
      the image size. This only shifts log-log curves; slopes are unchanged.
    * Non-square images: frequencies are in cycles/pixel on each axis (u / W, v / H), and the ring
      width is 1 / max(H, W), the finer axis spacing; for square images the bins are the integer
      radii of eq. 4. Rings stop at the Nyquist frequency 0.5 (corner frequencies form incomplete
      rings and are dropped), and the DC bin k = 0 is skipped.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["radial_psd", "spectral_slope"]

_CHUNK = 16  # images per FFT batch (bounds memory for large batches of large images)


def radial_psd(images: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch-averaged radial power spectrum.

    Args:
        images: (B, H, W) (or one (H, W)) array or tensor; bool masks are read as 0/1.
    Returns:
        (freqs, psd): float64 numpy arrays of the same length, freqs in cycles/pixel ascending
        from 1 / max(H, W) to 0.5, DC excluded.
    Raises:
        ValueError: wrong dimensionality, an image smaller than 2x2, or non-finite values.
    """
    x = torch.as_tensor(images)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] < 1:
        raise ValueError(f"images must be (B, H, W) or (H, W), got shape {tuple(x.shape)}")
    B, H, W = x.shape
    if H < 2 or W < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {H}x{W}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or Inf")

    # 1-2. Mean power over the batch, chunked so a (640, 512, 512) batch stays small in memory.
    power = torch.zeros((H, W), dtype=torch.float64, device=x.device)
    for start in range(0, B, _CHUNK):
        chunk = x[start : start + _CHUNK]
        chunk = chunk - chunk.mean(dim=(1, 2), keepdim=True)
        spec = torch.fft.fft2(chunk)  # (b, H, W) complex
        power += (spec.real**2 + spec.imag**2).sum(dim=0)
    power = power / (B * H * W)

    # 3. Ring index of every frequency, in units of the finer axis spacing 1 / max(H, W).
    L = max(H, W)
    fy = torch.fft.fftfreq(H, dtype=torch.float64, device=x.device)  # cycles/pixel
    fx = torch.fft.fftfreq(W, dtype=torch.float64, device=x.device)
    radius = torch.sqrt(fy.view(H, 1) ** 2 + fx.view(1, W) ** 2)  # (H, W)
    ring = torch.round(radius * L).long().flatten()  # (H*W,)
    n_rings = L // 2 + 1  # rings 0 .. L//2, i.e. up to Nyquist
    keep = ring < n_rings
    sums = torch.bincount(ring[keep], weights=power.flatten()[keep], minlength=n_rings)
    counts = torch.bincount(ring[keep], minlength=n_rings)
    k = torch.arange(n_rings, device=x.device)
    valid = (k > 0) & (counts > 0)
    freqs = (k[valid].to(torch.float64) / L).cpu().numpy()
    psd = (sums[valid] / counts[valid]).cpu().numpy()
    return freqs, psd


def spectral_slope(
    freqs: np.ndarray,
    psd: np.ndarray,
    fmin: float | None = None,
    fmax: float | None = None,
) -> float:
    """Least-squares slope of log10(psd) against log10(freqs) over fmin <= f <= fmax.

    A 1/f^alpha spectrum has slope -alpha. Bins with psd <= 0 (log undefined) are left out.
    Raises:
        ValueError: mismatched lengths, or fewer than 2 usable bins in the range.
    """
    f = np.asarray(freqs, dtype=np.float64).ravel()
    p = np.asarray(psd, dtype=np.float64).ravel()
    if f.shape != p.shape:
        raise ValueError(f"freqs and psd differ in length: {f.shape[0]} vs {p.shape[0]}")
    use = (f > 0) & (p > 0) & np.isfinite(f) & np.isfinite(p)
    if fmin is not None:
        use &= f >= fmin
    if fmax is not None:
        use &= f <= fmax
    if int(use.sum()) < 2:
        raise ValueError(
            f"need at least 2 positive bins to fit a slope in [fmin={fmin}, fmax={fmax}], "
            f"got {int(use.sum())}"
        )
    slope, _ = np.polyfit(np.log10(f[use]), np.log10(p[use]), 1)
    return float(slope)
