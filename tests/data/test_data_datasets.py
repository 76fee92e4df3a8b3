"""Tests for affmae.data.datasets: scanning, validation errors, statistics, crops, labelled pairs, splits."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from affmae.data.datasets import (
    ImageFolder,
    SegmentationFolder,
    compute_stats,
    fraction_indices,
    scan_images,
    split_indices,
)
from affmae.data.io import ImageError


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


# ---- scanning ---------------------------------------------------------------------------------


def test_scan_sorted_recursive_with_pages(tmp_path):
    _png(tmp_path / "b.png", _noise(16, 16, 0))
    _png(tmp_path / "sub" / "a.PNG", _noise(16, 16, 1))
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    _png(tmp_path / ".hidden" / "x.png", _noise(16, 16, 2))
    (tmp_path / "notes.txt").write_text("not an image")
    items = scan_images(tmp_path)
    got = [(p.relative_to(tmp_path).as_posix(), k) for p, k in items]
    assert got == [("b.png", 0), ("c.tif", 0), ("c.tif", 1), ("c.tif", 2), ("sub/a.PNG", 0)], f"items {got}"


def test_empty_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        scan_images(tmp_path)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no image files"):
        ImageFolder(tmp_path, (16, 16))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_images(tmp_path / "missing")


def test_bad_files_raise_or_are_skipped_with_count(tmp_path, caplog):
    for k in range(3):
        _png(tmp_path / f"ok{k}.png", _noise(16, 16, k))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.tif").write_bytes(b"garbage" * 20)
    with pytest.raises(ImageError, match=r"empty\.png.*empty"):
        scan_images(tmp_path)
    with caplog.at_level(logging.WARNING, logger="affmae.data.datasets"):
        items = scan_images(tmp_path, skip_bad=True)
    assert [p.name for p, _ in items] == ["ok0.png", "ok1.png", "ok2.png"], f"kept {items}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, f"expected one warning, got {warnings}"
    assert "skipped 2 " in warnings[0] and "empty.png" in warnings[0] and "junk.tif" in warnings[0], warnings[0]
    ds = ImageFolder(tmp_path, (16, 16), skip_bad=True)
    assert len(ds) == 3, f"dataset kept {len(ds)} items"


# ---- statistics ---------------------------------------------------------------------------------


def test_compute_stats_on_constant_images(tmp_path):
    for k, v in enumerate([51, 153]):  # 0.2 and 0.6 after / 255
        _png(tmp_path / f"{k}.png", np.full((8, 10), v, np.uint8))
    mean, std = compute_stats(scan_images(tmp_path))
    assert abs(mean - 0.4) < 1e-6 and abs(std - 0.2) < 1e-6, f"mean {mean}, std {std} (want 0.4, 0.2)"
    _png(tmp_path / "2.png", np.full((8, 10), 255, np.uint8))
    # max_images=2 takes the evenly spaced ends: 0.2 and 1.0.
    mean, std = compute_stats(scan_images(tmp_path), max_images=2)
    assert abs(mean - 0.6) < 1e-6 and abs(std - 0.4) < 1e-6, f"mean {mean}, std {std} (want 0.6, 0.4)"


# ---- ImageFolder --------------------------------------------------------------------------------


def test_size_must_be_multiple_of_patch_and_fit(tmp_path):
    _png(tmp_path / "big.png", _noise(64, 80, 0))
    _png(tmp_path / "small.png", _noise(40, 80, 1))
    with pytest.raises(ValueError, match=r"size \(60, 64\).*multiple of patch_size 8"):
        ImageFolder(tmp_path, (60, 64))
    with pytest.raises(ImageError, match=r"small\.png.*40x80.*smaller than the training size 48x64"):
        ImageFolder(tmp_path, (48, 64), mode="random_crop")
    ds = ImageFolder(tmp_path, (48, 64), mode="resize")
    assert ds[1].shape == (1, 48, 64), f"resize gave {tuple(ds[1].shape)}"


def test_crops_are_deterministic_per_seed_epoch_index(tmp_path):
    for k in range(3):
        _png(tmp_path / f"{k}.png", _noise(96, 128, k))
    kw = dict(size=(16, 24), patch_size=8, mode="random_crop", mean=0.5, std=0.25)
    a, b = ImageFolder(tmp_path, seed=7, **kw), ImageFolder(tmp_path, seed=7, **kw)
    for ds in (a, b):
        ds.set_epoch(3)
    for i in range(3):
        assert torch.equal(a[i], b[i]), f"same (seed, epoch, index) gave different crops at i={i}"
        assert torch.equal(a[i], a[i]), "repeated reads of one item differ"
    b.set_epoch(4)
    assert any(not torch.equal(a[i], b[i]) for i in range(3)), "epoch does not change the crops"
    c = ImageFolder(tmp_path, seed=8, **kw)
    c.set_epoch(3)
    assert any(not torch.equal(a[i], c[i]) for i in range(3)), "seed does not change the crops"
    # The crop is a window of the normalised page: find it exactly.
    page = np.asarray(Image.open(tmp_path / "0.png"), np.float32) / 255
    x = a[0][0].numpy() * 0.25 + 0.5
    windows = np.lib.stride_tricks.sliding_window_view(page, (16, 24))  # (81, 105, 16, 24)
    hits = int((np.abs(windows - x).max(axis=(2, 3)) < 1e-6).sum())
    assert hits == 1, f"crop matched {hits} windows of the page"


def test_center_crop_and_normalisation(tmp_path):
    arr = _noise(32, 40, 0)
    _png(tmp_path / "a.png", arr)
    ds = ImageFolder(tmp_path, (16, 24), mode="center_crop", mean=0.25, std=0.5)
    want = (arr[8:24, 8:32].astype(np.float32) / 255 - 0.25) / 0.5
    got = ds[0]
    assert got.dtype == torch.float32 and got.shape == (1, 16, 24), f"{got.dtype} {tuple(got.shape)}"
    assert np.allclose(got[0].numpy(), want, atol=1e-6), "center crop or (x - mean) / std is wrong"
    auto = ImageFolder(tmp_path, (16, 24), mode="center_crop")
    assert abs(auto.mean - arr.mean() / 255) < 1e-6, f"computed mean {auto.mean}"


# ---- SegmentationFolder ---------------------------------------------------------------------------


def _pairs(root, n=3, h=32, w=40, values=(0, 255)):
    rng = np.random.default_rng(0)
    for k in range(n):
        lab = rng.choice(np.array(values, np.uint8), size=(h, w))
        _png(root / "images" / f"{k:02d}.png", lab)  # image pixels equal the label values
        _png(root / "masks" / f"{k:02d}.png", lab)


def test_segmentation_pairs_same_crop_and_class_map(tmp_path):
    _pairs(tmp_path)
    ds = SegmentationFolder(tmp_path, (16, 24), mean=0.0, std=1.0, seed=3)
    assert ds.class_values == [0, 255] and ds.num_classes == 2, f"classes {ds.class_values}"
    for i in range(len(ds)):
        img, tgt = ds[i]
        assert img.shape == (1, 16, 24) and tgt.shape == (16, 24) and tgt.dtype == torch.int64
        assert torch.equal((img[0] > 0.5).long(), tgt), f"image and target crops differ at item {i}"
    rev = SegmentationFolder(tmp_path, (16, 24), class_values=[255, 0], mean=0.0, std=1.0, seed=3)
    img, tgt = rev[0]
    assert torch.equal((img[0] < 0.5).long(), tgt), "class_values order [255, 0] not respected"
    res = SegmentationFolder(tmp_path, (24, 16), mode="resize", mean=0.0, std=1.0)
    assert set(res[0][1].unique().tolist()) <= {0, 1}, "nearest resize made new labels"


def test_segmentation_rgba_masks_and_classes_yaml(tmp_path):
    _pairs(tmp_path, n=2, values=(0, 1, 2))
    (tmp_path / "classes.yaml").write_text("0: a\n1: b\n2: c\n3: d\n")
    m = np.asarray(Image.open(tmp_path / "masks" / "00.png"))
    _png(tmp_path / "masks" / "00.png", np.stack([m, m, m, np.full_like(m, 255)], -1))
    ds = SegmentationFolder(tmp_path, (16, 16))
    assert ds.class_values == [0, 1, 2, 3] and ds.class_names == ["a", "b", "c", "d"], ds.class_names


def test_segmentation_validation_errors(tmp_path):
    _pairs(tmp_path, values=(0, 255))
    (tmp_path / "masks" / "02.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for image stem\(s\) 02"):
        SegmentationFolder(tmp_path, (16, 16))
    _png(tmp_path / "masks" / "02.png", np.zeros((24, 40), np.uint8))
    with pytest.raises(ImageError, match=r"02\.png.*\(1, 32, 40\).*masks/02\.png.*\(1, 24, 40\)"):
        SegmentationFolder(tmp_path, (16, 16))
    bad = np.zeros((32, 40), np.uint8)
    bad[0, :3] = [7, 9, 255]
    _png(tmp_path / "masks" / "02.png", bad)
    msg = r"masks/02\.png: mask values \[7, 9\] are not in class_values \[0, 255\]"
    with pytest.raises(ImageError, match=msg):
        SegmentationFolder(tmp_path, (16, 16), class_values=[0, 255])


def test_splits_and_label_fractions_are_deterministic_and_nested(tmp_path):
    train, val = split_indices(20, 0.25, seed=1)
    assert len(val) == 5 and sorted(train + val) == list(range(20)), f"split {train} / {val}"
    assert (train, val) == split_indices(20, 0.25, seed=1), "split not deterministic"
    assert val != split_indices(20, 0.25, seed=2)[1], "seed does not change the split"
    f5, f25, f100 = (fraction_indices(train, f, seed=0) for f in (0.05, 0.25, 1.0))
    assert len(f5) == 1 and len(f25) == 4 and f100 == train, f"sizes {len(f5)}, {len(f25)}, {len(f100)}"
    assert set(f5) <= set(f25) <= set(f100), "label-fraction subsets are not nested"
    _pairs(tmp_path, n=4)
    ds = SegmentationFolder(tmp_path, (16, 16), mean=0.0, std=1.0)
    sub = ds.subset([3, 1])
    assert len(sub) == 2 and sub.pairs[0].image.name == "03.png", f"subset {sub.pairs}"
    assert sub.class_values == ds.class_values and sub.mean == ds.mean
    with pytest.raises(IndexError, match=r"\[9\]"):
        ds.subset([9])
