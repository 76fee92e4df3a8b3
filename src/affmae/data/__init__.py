"""Data: image/mask reading, folder datasets, the synthetic EM generator, GPU batch augmentation.

Paper: Sec. 5 (pretraining on grayscale EM with resize + normalisation; fine-tuning with heavy
augmentation). Modules:

* :mod:`affmae.data.io` - ``read_image`` / ``read_mask`` / ``image_shape`` / ``ImageError``.
* :mod:`affmae.data.datasets` - ``scan_images``, ``compute_stats``, ``ImageFolder`` (pretraining),
  ``SegmentationFolder`` (fine-tuning), ``split_indices`` / ``fraction_indices``.
* :mod:`affmae.data.synthetic` - ``generate`` / ``write_dataset`` (EM-like images with labels).
* :mod:`affmae.data.augment` - ``SegmentationAugment`` (imports kornia, so it is loaded lazily:
  ``import affmae.data`` stays cheap for pretraining).
"""

from affmae.data.datasets import (
    ImageFolder,
    SegmentationFolder,
    compute_stats,
    fraction_indices,
    load_class_map,
    scan_images,
    split_indices,
)
from affmae.data.io import IMAGE_SUFFIXES, ImageError, check_image, image_shape, read_image, read_mask
from affmae.data.synthetic import CLASS_NAMES, generate, write_dataset

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageFolder",
    "SegmentationAugment",
    "SegmentationFolder",
    "check_image",
    "compute_stats",
    "fraction_indices",
    "generate",
    "image_shape",
    "load_class_map",
    "read_image",
    "read_mask",
    "scan_images",
    "split_indices",
    "write_dataset",
]


def __getattr__(name: str):
    # Lazy: kornia takes seconds to import and only fine-tuning needs it.
    if name == "SegmentationAugment":
        from affmae.data.augment import SegmentationAugment

        return SegmentationAugment
    raise AttributeError(f"module 'affmae.data' has no attribute {name!r}")
