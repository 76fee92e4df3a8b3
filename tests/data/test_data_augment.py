"""Tests for affmae.data.augment: image/target alignment, valid targets, switches, determinism."""

from __future__ import annotations

import pytest
import torch

from affmae.data.augment import SegmentationAugment


def _blocks(b=4, h=48, w=64, classes=2, seed=0):
    """Piecewise-constant labels (blocks of 8 px) and an image whose pixels equal the labels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (b, h // 8, w // 8), generator=g)
    y = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (B, H, W)
    return y[:, None].float(), y


def _strong(**kw):
    return SegmentationAugment(photometric=False, degrees=60, translate=0.2, shear=15, elastic_alpha=3,
                               p_affine=1.0, p_elastic=1.0, **kw)


def _geometric_agreement(aug, device="cpu"):
    x, y = _blocks()
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    xa, ya = aug(x, y)
    # Where the bilinear footprint was uniform the image is (nearly) an integer and nearest
    # sampling must pick that same label.
    clean = (xa[:, 0] - xa[:, 0].round()).abs() < 1e-4
    valid = ya != aug.ignore_index
    agree = (xa[:, 0].round().long() == ya) | ~clean | ~valid
    return x, y, xa, ya, clean & valid, agree


def test_geometry_keeps_image_and_target_aligned():
    x, y, xa, ya, checked, agree = _geometric_agreement(_strong())
    assert checked.float().mean() > 0.8, f"only {checked.float().mean():.2f} of pixels checkable"
    assert agree.all(), f"{(~agree).sum()} pixels where image and target disagree"
    assert not torch.equal(ya, y), "augmentation did not move anything"
    # The check can fail: targets of a differently seeded draw do not agree with these images.
    torch.manual_seed(1)
    _, y_other = _strong()(x, y)
    clean = (xa[:, 0] - xa[:, 0].round()).abs() < 1e-4
    assert (xa[:, 0].round().long() != y_other)[clean].float().mean() > 0.05, "alignment check is vacuous"


def test_targets_stay_valid_classes_or_ignore():
    x, y = _blocks(classes=3)
    torch.manual_seed(2)
    _, ya = _strong()(x, y)
    assert ya.dtype == torch.int64 and set(ya.unique().tolist()) <= {0, 1, 2}, f"reflection: {ya.unique()}"
    torch.manual_seed(2)
    aug = _strong(padding="zeros", ignore_index=255)
    xa, ya = aug(x, y)
    vals = set(ya.unique().tolist())
    assert vals <= {0, 1, 2, 255} and 255 in vals, f"zeros padding: {vals}"
    # Deep outside (3 x 3 neighbourhood all ignored) the bilinear image is exactly the zero fill.
    near_valid = torch.nn.functional.max_pool2d((ya != 255)[:, None].float(), 3, 1, 1)[:, 0] > 0
    outside = xa[:, 0][~near_valid]
    assert outside.numel() > 0 and (outside.abs() < 1e-6).all(), "image outside is not 0"
    _, _, _, _, checked, agree = _geometric_agreement(aug)
    assert agree.all() and checked.float().mean() > 0.5, "alignment broken with zeros padding"


def test_deterministic_under_manual_seed_and_switches():
    x, y = _blocks()
    aug = SegmentationAugment()
    torch.manual_seed(3)
    a = aug(x, y)
    torch.manual_seed(3)
    b = aug(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "same seed gave different batches"
    torch.manual_seed(4)
    c = aug(x, y)
    assert not torch.equal(a[0], c[0]), "seed does not change the augmentation"
    off = SegmentationAugment(flips=False, affine=False, elastic=False, photometric=False)
    xo, yo = off(x, y)
    assert torch.equal(xo, x) and torch.equal(yo, y), "all groups off is not the identity"
    photo = SegmentationAugment(flips=False, affine=False, elastic=False, p_photometric=1.0)
    xp, yp = photo(x, y)
    assert torch.equal(yp, y) and not torch.equal(xp, x), "photometric must change images only"


def test_photometric_works_in_intensity_units():
    x = torch.rand(6, 1, 16, 16) * 0.5 + 0.25
    mean, std = 0.4, 0.2
    aug = SegmentationAugment(flips=False, affine=False, elastic=False, brightness=0.1, contrast=0.0,
                              gamma=0.0, blur_sigma=0.0, noise_std=0.0, p_photometric=1.0, mean=mean, std=std)
    torch.manual_seed(0)
    xa, _ = aug((x - mean) / std, torch.zeros(6, 16, 16, dtype=torch.long))
    shift = xa * std + mean - x  # brightness: one additive offset per image, in intensity units
    per_image = shift.flatten(1)
    assert (per_image.max(1).values - per_image.min(1).values).max() < 1e-5, "offset not constant per image"
    assert per_image.abs().max() <= 0.1 + 1e-5 and per_image.abs().max() > 0.01, f"offsets {per_image[:, 0]}"


def test_shape_checks_and_dtype_kept():
    aug = SegmentationAugment()
    x, y = _blocks(b=2)
    with pytest.raises(ValueError, match=r"targets must be int64 \(B, H, W\)"):
        aug(x, y.int())
    with pytest.raises(ValueError, match=r"images must be float \(B, 1, H, W\), got \(2, 48, 64\)"):
        aug(x[:, 0], y)
    with pytest.raises(ValueError, match="padding must be one of"):
        SegmentationAugment(padding="wrap")
    xa, ya = aug(x.bfloat16(), y)
    assert xa.dtype == torch.bfloat16 and ya.dtype == torch.int64, f"{xa.dtype} {ya.dtype}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_alignment_on_gpu():
    _, _, xa, ya, checked, agree = _geometric_agreement(_strong(), device="cuda")
    assert xa.is_cuda and ya.is_cuda
    assert agree.all() and checked.float().mean() > 0.8, f"{(~agree).sum()} disagreeing pixels on CUDA"
