"""Tests for affmae.data.synthetic: shapes, classes, determinism, a non-trivial task, the written dataset."""

from __future__ import annotations

import numpy as np
import yaml

from affmae.data.datasets import SegmentationFolder
from affmae.data.synthetic import CLASS_NAMES, generate, write_dataset


def test_shapes_classes_and_fractions():
    images, labels = generate(8, (64, 96), seed=0)
    assert images.shape == labels.shape == (8, 64, 96), f"{images.shape} {labels.shape}"
    assert images.dtype == np.uint8 and labels.dtype == np.uint8, f"{images.dtype} {labels.dtype}"
    frac = np.bincount(labels.ravel(), minlength=4) / labels.size
    assert frac[3] == 0, f"labels outside 0..2: {np.unique(labels)}"
    assert 0.6 < frac[0] < 0.95 and 0.05 < frac[1] < 0.3 and 0.005 < frac[2] < 0.15, f"class fractions {frac}"
    assert images.std() > 15, f"images nearly flat (std {images.std():.1f})"
    assert len(CLASS_NAMES) == 3


def test_deterministic_per_seed_and_index():
    a_img, a_lab = generate(6, (64, 64), seed=5)
    b_img, b_lab = generate(6, (64, 64), seed=5)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab), "same seed, different output"
    c_img, _ = generate(3, (64, 64), seed=5)
    assert np.array_equal(a_img[:3], c_img), "image i depends on n"
    d_img, _ = generate(6, (64, 64), seed=6)
    assert not np.array_equal(a_img, d_img), "seed does not change the images"
    assert not np.array_equal(a_img[0], a_img[1]), "images of one batch are identical"


def test_task_is_not_a_threshold():
    # Membranes are darker than cytoplasm on average, but distractors and noise overlap them, so the
    # best single intensity threshold misses a good share of membrane pixels.
    images, labels = generate(8, (96, 96), seed=1)
    x, mem = images.ravel().astype(np.int32), labels.ravel() == 1
    mito = labels.ravel() == 2
    assert x[mem].mean() + 20 < x[~mem & ~mito].mean(), "membranes not darker than cytoplasm"
    best = 0.0
    for t in range(256):
        pred = x < t
        inter = (pred & mem).sum()
        best = max(best, inter / max(1, (pred | mem).sum()))
    assert best < 0.6, f"a threshold already gives membrane IoU {best:.2f}: task too easy"


def test_write_dataset_reads_back(tmp_path):
    root = write_dataset(tmp_path / "syn", 3, (32, 48), seed=2)
    names = sorted(p.name for p in (root / "images").iterdir())
    assert names == ["0000.png", "0001.png", "0002.png"], f"files {names}"
    class_map = yaml.safe_load((root / "classes.yaml").read_text())
    assert class_map == {0: "cytoplasm", 1: "membrane", 2: "mitochondrion"}, f"classes.yaml {class_map}"
    ds = SegmentationFolder(root, (32, 48), mode="center_crop")
    _, labels = generate(3, (32, 48), seed=2)
    assert ds.class_names == list(CLASS_NAMES), f"class names {ds.class_names}"
    for i in range(3):
        assert np.array_equal(ds[i][1].numpy(), labels[i]), f"mask {i} differs from generate()"
