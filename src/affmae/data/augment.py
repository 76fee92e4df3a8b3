"""Heavy augmentation of a segmentation batch on its own device (GPU), images and targets aligned.

Paper: fine-tuning uses "heavy data augmentation including random flips, affine transformations,
photometric distortion, and elastic transforms" (Sec. 5); issue 5 asks for it on the GPU batch.

How (deliberate decisions):
1. Flips: per-sample horizontal / vertical, exact (``torch.flip``), same for image and target.
2. Affine and elastic are composed into ONE sampling grid per sample (kornia builds the affine
   matrix and smooths the elastic field), and ``grid_sample`` applies that grid to the image
   (bilinear) and to the target (nearest). One resampling, so images are not blurred twice and the
   target sees exactly the image's geometry. (kornia's ``AugmentationSequential`` would resample once
   per transform.)
3. Pixels that come from outside the image: ``padding="reflection"`` (default) mirrors image and
   target alike, so every target pixel stays a valid class and no loss needs an ignore index;
   ``padding="zeros"`` fills the image with 0 (the dataset mean, as images arrive normalised) and
   the target with ``ignore_index`` (255 by default), which the loss must then skip.
4. Photometric ops act on images only, in intensity units: the batch is un-normalised with the
   dataset ``mean``/``std`` given here, changed, and normalised again. Brightness adds, contrast
   scales about each image's mean, gamma raises max(x, 0) to a power (negative intensities, only
   possible after brightness, become 0), blur is a Gaussian with a per-sample sigma (kornia), noise
   is Gaussian with a per-sample std.
5. Each op fires per sample with its probability; all random numbers come from torch's default
   generator of the batch's device, so ``torch.manual_seed`` makes a run repeatable (on one device
   kind). Under DDP, seed each rank differently or every rank augments alike.
Elastic strength is in pixels: ``elastic_alpha`` is the RMS displacement, ``elastic_sigma`` the
smoothness of the displacement field (Gaussian sigma), not kornia's unnormalised alpha.
The module always augments (also in eval mode): call it on training batches only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import get_affine_matrix2d
from torch import nn

__all__ = ["SegmentationAugment"]

PADDINGS = ("reflection", "zeros")


def _uniform(lo: float, hi: float, n: int, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device)


def _fires(p: float, n: int, device) -> torch.Tensor:
    """(n,) bool: which samples get an op applied with probability p."""
    return torch.rand(n, device=device) < p


class SegmentationAugment(nn.Module):
    """Random flips, affine, elastic and photometric changes of ``(images, targets)``.

    ``forward(images (B, 1, H, W) float, targets (B, H, W) int64) -> same shapes and dtypes``.
    Group switches: ``flips``, ``affine``, ``elastic``, ``photometric``. Strengths:
    degrees (rotation range +-), scale (min, max; drawn log-uniform, isotropic), translate (fraction
    of the size, +-), shear (degrees, +-, each axis), elastic_alpha / elastic_sigma (pixels),
    brightness (+- intensity), contrast (factor in 1 +- contrast), gamma (exponent in exp(+-gamma)),
    blur_sigma (max sigma, pixels), noise_std (max std, intensity). ``p_*``: per-sample probability.
    ``mean`` / ``std``: the dataset statistics the images were normalised with.
    """

    def __init__(
        self,
        flips: bool = True,
        affine: bool = True,
        elastic: bool = True,
        photometric: bool = True,
        degrees: float = 45.0,
        scale: tuple[float, float] = (0.8, 1.25),
        translate: float = 0.1,
        shear: float = 10.0,
        elastic_alpha: float = 3.0,
        elastic_sigma: float = 10.0,
        brightness: float = 0.1,
        contrast: float = 0.2,
        gamma: float = 0.3,
        blur_sigma: float = 1.0,
        noise_std: float = 0.03,
        p_affine: float = 0.8,
        p_elastic: float = 0.5,
        p_photometric: float = 0.5,
        mean: float = 0.0,
        std: float = 1.0,
        padding: str = "reflection",
        ignore_index: int = 255,
    ):
        super().__init__()
        for name, v in dict(degrees=degrees, translate=translate, shear=shear, elastic_alpha=elastic_alpha,
                            elastic_sigma=elastic_sigma, brightness=brightness, contrast=contrast,
                            gamma=gamma, blur_sigma=blur_sigma, noise_std=noise_std).items():
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        for name, v in dict(p_affine=p_affine, p_elastic=p_elastic, p_photometric=p_photometric).items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
        if contrast >= 1.0:
            raise ValueError(f"contrast must be < 1 (factor 1 +- contrast stays positive), got {contrast}")
        if elastic and elastic_sigma <= 0:
            raise ValueError(f"elastic_sigma must be > 0 when elastic is on, got {elastic_sigma}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be finite and > 0, got {std}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.flips, self.affine, self.elastic, self.photometric = flips, affine, elastic, photometric
        self.degrees, self.translate, self.shear = degrees, translate, shear
        self.scale = (float(scale[0]), float(scale[1]))
        self.elastic_alpha, self.elastic_sigma = elastic_alpha, elastic_sigma
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma
        self.blur_sigma, self.noise_std = blur_sigma, noise_std
        self.p_affine, self.p_elastic, self.p_photometric = p_affine, p_elastic, p_photometric
        self.mean, self.std = float(mean), float(std)
        self.padding, self.ignore_index = padding, int(ignore_index)

    def extra_repr(self) -> str:
        on = [n for n in ("flips", "affine", "elastic", "photometric") if getattr(self, n)]
        return f"groups={on}, padding={self.padding!r}"

    # ---- geometry ----------------------------------------------------------------------------

    def _affine_inverse(self, b: int, h: int, w: int, device) -> torch.Tensor:
        """(B, 3, 3) maps output pixel (x, y, 1) -> source pixel; identity where the op does not fire."""
        angle = _uniform(-self.degrees, self.degrees, b, device)
        log_s = _uniform(math.log(self.scale[0]), math.log(self.scale[1]), b, device)
        scale = torch.exp(log_s)[:, None].expand(b, 2)  # (B, 2) isotropic
        shift = torch.stack([_uniform(-self.translate, self.translate, b, device) * w,
                             _uniform(-self.translate, self.translate, b, device) * h], dim=1)  # (B, 2)
        shear_x = torch.deg2rad(_uniform(-self.shear, self.shear, b, device))
        shear_y = torch.deg2rad(_uniform(-self.shear, self.shear, b, device))
        center = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], device=device).expand(b, 2)
        fwd = get_affine_matrix2d(shift, center, scale, angle, shear_x, shear_y)  # (B, 3, 3) source -> output
        inv = torch.linalg.inv(fwd)
        eye = torch.eye(3, device=device).expand(b, 3, 3)
        return torch.where(_fires(self.p_affine, b, device)[:, None, None], inv, eye)

    def _elastic_field(self, b: int, h: int, w: int, device) -> torch.Tensor:
        """(B, H, W, 2) smooth displacement (x, y) in pixels with RMS ``elastic_alpha``; 0 where off."""
        noise = torch.randn(b, 2, h, w, device=device)
        k = 2 * math.ceil(3 * self.elastic_sigma) + 1
        k = min(k, 2 * ((min(h, w) - 1) // 2) + 1)  # reflect padding needs the kernel inside the image
        smooth = gaussian_blur2d(noise, (k, k), (self.elastic_sigma, self.elastic_sigma))  # (B, 2, H, W)
        rms = smooth.square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-8)
        disp = smooth / rms * self.elastic_alpha
        disp = disp * _fires(self.p_elastic, b, device)[:, None, None, None]
        return disp.permute(0, 2, 3, 1)  # (B, H, W, 2)

    def _geometric(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        dev = x.device
        ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                                torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
        pix = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, h * w, 3)  # (1, H*W, 3)
        if self.affine:
            src = pix @ self._affine_inverse(b, h, w, dev).transpose(1, 2)  # (B, H*W, 3)
            src = src[..., :2].reshape(b, h, w, 2)  # (B, H, W, 2) source (x, y) in pixels
        else:
            src = pix[..., :2].reshape(1, h, w, 2).expand(b, h, w, 2)
        if self.elastic:
            src = src + self._elastic_field(b, h, w, dev)
        # Pixels -> grid_sample's [-1, 1] (align_corners=False: -1 and 1 are the outer pixel edges).
        size = torch.tensor([w, h], device=dev, dtype=torch.float32)
        grid = (2.0 * src + 1.0) / size - 1.0
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)
        if self.padding == "zeros":
            # Shift labels by one so 0 marks "outside the image", then map it to the ignore index.
            yt = F.grid_sample((y + 1)[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)
            yt = yt[:, 0].round().long() - 1
            y = torch.where(yt < 0, torch.full_like(yt, self.ignore_index), yt)
        else:
            yt = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode=self.padding,
                               align_corners=False)
            y = yt[:, 0].round().long()
        return x, y

    # ---- photometric -------------------------------------------------------------------------

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        b, dev, p = x.shape[0], x.device, self.p_photometric
        per = lambda t: t[:, None, None, None]  # noqa: E731  (B,) -> (B, 1, 1, 1)
        x = x * self.std + self.mean  # intensity units
        x = x + per(_uniform(-self.brightness, self.brightness, b, dev) * _fires(p, b, dev))
        factor = torch.where(_fires(p, b, dev), _uniform(1 - self.contrast, 1 + self.contrast, b, dev),
                             torch.ones(b, device=dev))
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * per(factor) + m
        expo = torch.where(_fires(p, b, dev), torch.exp(_uniform(-self.gamma, self.gamma, b, dev)),
                           torch.ones(b, device=dev))
        x = torch.where(per(expo != 1), x.clamp_min(0) ** per(expo), x)
        if self.blur_sigma > 0:
            sigma = _uniform(0.1, max(0.1, self.blur_sigma), b, dev)
            k = 2 * math.ceil(3 * max(0.1, self.blur_sigma)) + 1
            k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
            blurred = gaussian_blur2d(x, (k, k), torch.stack([sigma, sigma], dim=1))  # (B, 2) sigmas
            x = torch.where(per(_fires(p, b, dev)), blurred, x)
        std = _uniform(0.0, self.noise_std, b, dev) * _fires(p, b, dev)
        x = x + per(std) * torch.randn_like(x)
        return (x - self.mean) / self.std

    # ---- entry point -------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise ValueError(f"images must be float (B, 1, H, W), got {tuple(images.shape)} {images.dtype}")
        if targets.shape != (images.shape[0],) + images.shape[2:] or targets.dtype != torch.int64:
            raise ValueError(
                f"targets must be int64 (B, H, W) = {(images.shape[0],) + tuple(images.shape[2:])}, "
                f"got {tuple(targets.shape)} {targets.dtype}"
            )
        dtype = images.dtype
        x, y = images.float(), targets
        b, dev = x.shape[0], x.device
        if self.flips:
            fh = _fires(0.5, b, dev)
            fv = _fires(0.5, b, dev)
            x = torch.where(fh[:, None, None, None], x.flip(-1), x)
            y = torch.where(fh[:, None, None], y.flip(-1), y)
            x = torch.where(fv[:, None, None, None], x.flip(-2), x)
            y = torch.where(fv[:, None, None], y.flip(-2), y)
        if self.affine or self.elastic:
            x, y = self._geometric(x, y)
        if self.photometric:
            x = self._photometric(x)
        return x.to(dtype), y
