"""Mask figures (paper Figs. 6-7): files written, numbers returned, no checkpoint needed."""

import json
import math

import numpy as np
import pytest
import torch

from affmae.analysis.figures import mask_spectra_figure, plot_mask_examples, plot_spectra
from affmae.analysis.spectrum import radial_psd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path}: not a non-empty PNG ({len(data)} bytes)"


def test_plot_spectra_writes_png(tmp_path):
    x = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0))
    out = plot_spectra({"noise": radial_psd(x), "squared": radial_psd(x**2)}, tmp_path / "a" / "s.png")
    assert out == tmp_path / "a" / "s.png"
    _assert_png(out)
    with pytest.raises(ValueError, match="empty"):
        plot_spectra({}, tmp_path / "e.png")


def test_plot_mask_examples_with_and_without_images(tmp_path):
    masks = torch.rand(3, 4, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    _assert_png(plot_mask_examples(masks, tmp_path / "m.png"))
    images = np.random.default_rng(0).random((3, 16, 24))
    _assert_png(plot_mask_examples(masks, tmp_path / "mi.png", images=images, patch_size=4))
    with pytest.raises(ValueError, match="patch_size=8"):
        plot_mask_examples(masks, tmp_path / "bad.png", images=images, patch_size=8)


def test_mask_spectra_figure_without_images(tmp_path):
    res = mask_spectra_figure(None, (32, 32), 4, tmp_path, ratio=0.5, n=16, seed=0)
    json.dumps(res)  # must be JSON-ready
    for key in ("spectra", "mask_examples"):
        _assert_png(res["files"][key])
    assert res["slopes"]["images"] is None and res["slopes_below_patch_nyquist"]["images"] is None
    low = res["slopes_below_patch_nyquist"]
    # Paper 3.4: uniform masks are white below the patch frequency; Perlin masks are red.
    assert abs(low["uniform_masks"]) < 0.5, f"uniform masks low-band slope {low['uniform_masks']:.2f}"
    assert low["perlin_masks"] < low["uniform_masks"] - 0.5, (
        f"Perlin low-band slope {low['perlin_masks']:.2f} not clearly steeper than uniform "
        f"{low['uniform_masks']:.2f}"
    )
    again = mask_spectra_figure(None, (32, 32), 4, tmp_path / "again", ratio=0.5, n=16, seed=0)
    assert again["slopes"] == res["slopes"], "same seed gave different numbers"


def test_mask_spectra_figure_with_images_non_square(tmp_path):
    images = torch.rand(4, 8 * 4, 12 * 4, generator=torch.Generator().manual_seed(0))
    res = mask_spectra_figure(images, (8, 12), 4, tmp_path, ratio=0.75, n=8, seed=1)
    assert res["n_images"] == 4 and res["grid_hw"] == [8, 12]
    assert math.isfinite(res["slopes"]["images"]), f"image slope {res['slopes']['images']}"
    _assert_png(res["files"]["spectra"])
    _assert_png(res["files"]["mask_examples"])
    with pytest.raises(ValueError, match="grid_hw"):
        mask_spectra_figure(images, (8, 8), 4, tmp_path, n=2)
