"""Datasets over folders of grayscale images: unlabelled (pretraining) and image/mask pairs (fine-tuning).

Paper: AFFMAE pretrains at a fixed resolution with "minimal augmentation (Resize, Normalization)"
(Sec. 5) and fine-tunes on labelled pairs; issue 2 adds random/center crops, non-square sizes
(multiples of the patch), dataset mean/std computed once, and validation of every file before
training starts; issue 5 adds the labelled folder layout, class maps and label-fraction subsets.

Decisions:
* An item is one (file, page): every page of a multi-page TIFF stack is a separate sample.
* Validation at construction opens every file: a header check by default (``check="header"``;
  detects empty, corrupt, truncated PNG/JPEG/TIFF files and decodes colour/float files fully, see
  :func:`affmae.data.io.check_image`), or a full decode with ``check="full"``. Files that are too
  small for a crop are an error at construction (there is no padding); ``mode="resize"`` accepts any
  size and does not keep the aspect ratio.
* Hidden files and folders (names starting with ".", e.g. macOS "._x.png") are not scanned.
* Crop randomness comes from a ``torch.Generator`` seeded from (seed, epoch, index) through
  numpy's ``SeedSequence`` (no global RNG), so a resumed run sees the same samples. Call
  ``set_epoch`` before each epoch; DataLoader workers copy the dataset when they start, so with
  ``persistent_workers=True`` a later ``set_epoch`` does not reach them.
* Pixels are normalised (x - mean) / std with dataset statistics; masks become class indices in
  ``class_values`` order. Augmentation of the fine-tuning batch happens on the GPU
  (:mod:`affmae.data.augment`), not here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import Dataset

from affmae.data.io import IMAGE_SUFFIXES, ImageError, check_image, image_shape, read_image, read_mask

__all__ = [
    "ImageFolder",
    "SegmentationFolder",
    "compute_stats",
    "fraction_indices",
    "load_class_map",
    "scan_images",
    "split_indices",
]

log = logging.getLogger(__name__)

MODES = ("random_crop", "center_crop", "resize")
CHECKS = ("header", "full")
_MAX_NAMES = 10  # how many file names an error or warning lists before "... and N more"


# --------------------------------------------------------------------------------------------
# Scanning and statistics
# --------------------------------------------------------------------------------------------


def _list_files(root: Path) -> list[Path]:
    """Image files under root (recursive, sorted, hidden entries skipped); error if none."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: is not a folder")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                files.append(Path(dirpath) / name)
    if not files:
        raise FileNotFoundError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found in this folder")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _names(paths: Sequence[object]) -> str:
    shown = ", ".join(str(p) for p in paths[:_MAX_NAMES])
    return shown + (f" ... and {len(paths) - _MAX_NAMES} more" if len(paths) > _MAX_NAMES else "")


def _validate(files: list[Path], skip_bad: bool, check: str, what: str) -> dict[Path, tuple[int, int, int]]:
    """Open every file; {path: (pages, H, W)} of the good ones. Bad files raise or are skipped."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    shapes: dict[Path, tuple[int, int, int]] = {}
    bad: list[ImageError] = []
    for f in files:
        try:
            shapes[f] = check_image(f, full=check == "full")
        except ImageError as e:
            if not skip_bad:
                raise
            bad.append(e)
    if bad:
        log.warning(
            "skipped %d unreadable %s file(s) of %d: %s",
            len(bad), what, len(files), _names([str(e) for e in bad]),
        )
    if not shapes:
        raise ImageError(
            files[0].parent, f"all {len(files)} {what} file(s) are unreadable: {_names([str(e) for e in bad])}"
        )
    return shapes


def _scan(
    root: Path, skip_bad: bool, check: str
) -> tuple[list[tuple[Path, int]], dict[Path, tuple[int, int, int]]]:
    shapes = _validate(_list_files(root), skip_bad, check, "image")
    items = [(f, p) for f, (pages, _, _) in shapes.items() for p in range(pages)]
    return items, shapes


def scan_images(
    root: str | os.PathLike, skip_bad: bool = False, check: str = "header"
) -> list[tuple[Path, int]]:
    """All (file, page) items under ``root`` (recursive over IMAGE_SUFFIXES, sorted by path).

    Every file is opened (see module docstring for ``check``). An unreadable file raises
    :class:`ImageError` naming it, or with ``skip_bad=True`` is skipped and one warning gives the
    count and the names. A missing folder or one without images raises ``FileNotFoundError``
    naming the folder.
    """
    return _scan(Path(root), skip_bad, check)[0]


def compute_stats(items: Sequence[tuple[Path, int]], max_images: int = 256) -> tuple[float, float]:
    """(mean, std) over all pixels of up to ``max_images`` evenly spaced items (deterministic).

    Pixels of every chosen page count equally (a larger page weighs more). Combined per page with
    Chan's parallel-variance formula in float64, so many pages lose no precision.
    """
    if not items:
        raise ValueError("compute_stats: no items")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    k = min(len(items), max_images)
    picks = np.unique(np.linspace(0, len(items) - 1, k).round().astype(np.int64))
    n_tot, mean_tot, m2_tot = 0, 0.0, 0.0
    for i in picks:
        path, page = items[int(i)]
        x = read_image(path, page=page)[0].astype(np.float64)
        n, mean = x.size, float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        delta = mean - mean_tot
        n_new = n_tot + n
        mean_tot += delta * n / n_new
        m2_tot += m2 + delta * delta * n_tot * n / n_new
        n_tot = n_new
    return mean_tot, math.sqrt(m2_tot / n_tot)


# --------------------------------------------------------------------------------------------
# Shared geometry: sizes, crops, resizing
# --------------------------------------------------------------------------------------------


def _check_size(size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be (H, W) with positive entries, got {size}")
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"size {size} (H, W) is not a multiple of patch_size {patch_size}")
    return size


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_big_enough(shapes: dict[Path, tuple[int, int, int]], size: tuple[int, int], mode: str) -> None:
    if mode == "resize":
        return
    small = [(p, h, w) for p, (_, h, w) in shapes.items() if h < size[0] or w < size[1]]
    if small:
        path, h, w = small[0]
        raise ImageError(
            path,
            f"image is {h}x{w} (H x W), smaller than the training size {size[0]}x{size[1]} needed by "
            f"mode={mode!r}; {len(small)} file(s) too small: "
            f"{_names([f'{p} ({h}x{w})' for p, h, w in small])}. "
            "Use mode='resize' or a smaller size",
        )


def _stats(items, mean, std) -> tuple[float, float]:
    if (mean is None) != (std is None):
        raise ValueError(f"give both mean and std or neither, got mean={mean}, std={std}")
    if mean is None:
        mean, std = compute_stats(items)
    mean, std = float(mean), float(std)
    if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
        raise ValueError(f"dataset statistics unusable: mean={mean}, std={std} (std must be finite and > 0)")
    return mean, std


def _generator(seed: int, epoch: int, index: int) -> torch.Generator:
    # SeedSequence mixes the three integers so neighbouring (epoch, index) pairs are unrelated.
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _crop_box(
    shape_hw: tuple[int, int], size: tuple[int, int], mode: str, gen: torch.Generator
) -> tuple[int, int]:
    """Top-left corner (y0, x0) of the crop."""
    (h, w), (th, tw) = shape_hw, size
    if mode == "center_crop":
        return (h - th) // 2, (w - tw) // 2
    y0 = int(torch.randint(0, h - th + 1, (1,), generator=gen))
    x0 = int(torch.randint(0, w - tw + 1, (1,), generator=gen))
    return y0, x0


def _resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) float -> (1, h, w), antialiased bilinear (no aliasing when shrinking)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _resize_labels(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) int64 -> (h, w), nearest (labels stay labels)."""
    if tuple(y.shape) == size:
        return y
    return F.interpolate(y[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


# --------------------------------------------------------------------------------------------
# Unlabelled images (pretraining)
# --------------------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """Every (file, page) under ``root`` as a normalised float32 (1, H, W) tensor of size ``size``.

    mode: "random_crop" (a crop drawn from (seed, epoch, index)), "center_crop", or "resize" (whole
    page, aspect ratio not kept). ``mean``/``std`` None: computed once with :func:`compute_stats`
    (store them with the checkpoint and pass them back when resuming or fine-tuning).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | tuple[int, int],
        patch_size: int = 8,
        mode: str = "random_crop",
        mean: float | None = None,
        std: float | None = None,
        skip_bad: bool = False,
        seed: int = 0,
        check: str = "header",
    ):
        self.root = Path(root)
        self.size = _check_size(size, patch_size)
        self.patch_size = patch_size
        self.mode = _check_mode(mode)
        self.seed = int(seed)
        self.epoch = 0
        self.items, self.shapes = _scan(self.root, skip_bad, check)
        _check_big_enough(self.shapes, self.size, self.mode)
        self.mean, self.std = _stats(self.items, mean, std)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        """Item ``i`` (crop of the current epoch) or ``(epoch, i)`` (crop of that epoch: a loader
        that spans epochs passes the epoch with the index, so its workers need no set_epoch)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        path, page = self.items[i]
        x = read_image(path, page=page)[0]  # (H, W)
        if self.mode == "resize":
            out = _resize_image(torch.from_numpy(x)[None], self.size)
        else:
            y0, x0 = _crop_box(x.shape, self.size, self.mode, _generator(self.seed, epoch, i))
            crop = x[y0 : y0 + self.size[0], x0 : x0 + self.size[1]]
            out = torch.from_numpy(np.ascontiguousarray(crop))[None]  # (1, H, W)
        return (out - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# Labelled pairs (fine-tuning)
# --------------------------------------------------------------------------------------------


def load_class_map(path: str | os.PathLike) -> dict[int, str]:
    """Read a class map YAML ``{mask value: class name}`` (as written by ``synthetic.write_dataset``)."""
    path = Path(path)
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: class map must be a non-empty mapping value -> name, got {data!r}")
    try:
        return {int(k): str(v) for k, v in data.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: class map keys must be integer mask values, got {list(data)}") from e


@dataclass(frozen=True)
class _Pair:
    image: Path
    mask: Path
    page: int


class SegmentationFolder(Dataset):
    """Image/mask pairs from ``root/images`` and ``root/masks``, matched by path without suffix.

    ``class_values``: mask values in class order ([0, 255] -> classes 0, 1). None: taken from
    ``root/classes.yaml`` (value -> name) when present, else the sorted union of values found in
    the masks. ``class_names`` come from classes.yaml where it names a value, else ``str(value)``.
    Multi-page images pair with masks of the same page count, page by page.

    Every mask is read at construction (to check values), so a bad pair fails before training.
    ``__getitem__`` returns (image float32 (1, H, W) normalised, target int64 (H, W) class indices)
    with the same crop, masks resized with nearest.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | tuple[int, int],
        patch_size: int = 8,
        mode: str = "random_crop",
        class_values: Sequence[int] | None = None,
        mean: float | None = None,
        std: float | None = None,
        seed: int = 0,
        check: str = "header",
    ):
        self.root = Path(root)
        self.size = _check_size(size, patch_size)
        self.patch_size = patch_size
        self.mode = _check_mode(mode)
        self.seed = int(seed)
        self.epoch = 0
        self.pairs = self._match(check)
        self.class_values, self.class_names = self._classes(class_values)
        cv = np.asarray(self.class_values, dtype=np.int64)
        self._sorter = np.argsort(cv)
        self._sorted_values = cv[self._sorter]
        self.mean, self.std = _stats([(p.image, p.page) for p in self.pairs], mean, std)

    # ---- construction-time validation ------------------------------------------------------

    def _match(self, check: str) -> list[_Pair]:
        img_dir, mask_dir = self.root / "images", self.root / "masks"
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f"{d}: folder does not exist (expected {self.root}/images and {self.root}/masks)"
                )
        images, masks = _by_stem(img_dir), _by_stem(mask_dir)
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask:
            raise FileNotFoundError(f"{mask_dir}: no mask for image stem(s) {_names(no_mask)}")
        if no_image:
            raise FileNotFoundError(f"{img_dir}: no image for mask stem(s) {_names(no_image)}")
        img_shapes = _validate([images[s] for s in sorted(images)], False, check, "image")
        pairs = []
        for stem in sorted(images):
            ip, mp = images[stem], masks[stem]
            ishape, mshape = img_shapes[ip], image_shape(mp)
            if ishape != mshape:
                raise ImageError(
                    ip, f"image has (pages, H, W) = {ishape} but its mask {mp} has {mshape}; they must match"
                )
            pairs.extend(_Pair(ip, mp, p) for p in range(ishape[0]))
        _check_big_enough(img_shapes, self.size, self.mode)
        return pairs

    def _classes(self, class_values: Sequence[int] | None) -> tuple[list[int], list[str]]:
        # Read every mask once: the values found decide the classes (or are checked against them).
        found: dict[Path, np.ndarray] = {}
        for p in self.pairs:
            vals = np.unique(read_mask(p.mask, page=p.page))
            found[p.mask] = np.union1d(found.get(p.mask, vals), vals)
        yaml_path = self.root / "classes.yaml"
        names_map = load_class_map(yaml_path) if yaml_path.exists() else {}
        if class_values is None:
            if names_map:
                class_values = sorted(names_map)
            else:
                class_values = sorted(set(np.concatenate(list(found.values())).tolist()))
        class_values = [int(v) for v in class_values]
        if len(set(class_values)) != len(class_values):
            raise ValueError(f"class_values has duplicates: {class_values}")
        allowed = set(class_values)
        bad = [(m, sorted(set(v.tolist()) - allowed)) for m, v in found.items() if set(v.tolist()) - allowed]
        if bad:
            m, vals = bad[0]
            more = ""
            if len(bad) > 1:
                more = f"; {len(bad)} mask file(s) affected: {_names([str(b[0]) for b in bad])}"
            raise ImageError(m, f"mask values {vals} are not in class_values {class_values}{more}")
        return class_values, [names_map.get(v, str(v)) for v in class_values]

    # ---- sampling --------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, indices: Sequence[int]) -> "SegmentationFolder":
        """A view on some pairs, sharing classes, statistics, size, mode and seed (for splits).

        Crop randomness stays keyed on the index inside the subset.
        """
        n = len(self.pairs)
        bad = [int(i) for i in indices if not 0 <= int(i) < n]
        if bad:
            raise IndexError(f"subset indices {bad[:_MAX_NAMES]} out of range for {n} pairs")
        sub = object.__new__(SegmentationFolder)
        sub.__dict__.update(self.__dict__)
        sub.pairs = [self.pairs[int(i)] for i in indices]
        return sub

    def to_classes(self, mask: np.ndarray) -> np.ndarray:
        """Raw mask values -> class indices (values must be in class_values)."""
        return self._sorter[np.searchsorted(self._sorted_values, mask)]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair ``i`` or ``(epoch, i)``, as for ImageFolder."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        pair = self.pairs[i]
        x = read_image(pair.image, page=pair.page)[0]  # (H, W)
        m = read_mask(pair.mask, page=pair.page)
        y = self.to_classes(m)
        if self.mode == "resize":
            img = _resize_image(torch.from_numpy(x)[None], self.size)
            tgt = _resize_labels(torch.from_numpy(y), self.size)
        else:
            y0, x0 = _crop_box(x.shape, self.size, self.mode, _generator(self.seed, epoch, i))
            sl = (slice(y0, y0 + self.size[0]), slice(x0, x0 + self.size[1]))
            img = torch.from_numpy(np.ascontiguousarray(x[sl]))[None]  # (1, H, W)
            tgt = torch.from_numpy(np.ascontiguousarray(y[sl]))  # (H, W)
        return (img - self.mean) / self.std, tgt.long()


def _by_stem(folder: Path) -> dict[str, Path]:
    """{relative path without suffix: file}; two files with one stem is an error."""
    out: dict[str, Path] = {}
    for f in _list_files(folder):
        stem = f.relative_to(folder).with_suffix("").as_posix()
        if stem in out:
            raise ImageError(f, f"has the same stem {stem!r} as {out[stem]}; keep one of them")
        out[stem] = f
    return out


# --------------------------------------------------------------------------------------------
# Deterministic splits
# --------------------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, val) index lists, a seeded shuffle of range(n); each sorted.

    The val part has round(n * val_fraction) items (at least 1 when val_fraction > 0); both parts
    must be non-empty unless val_fraction == 0.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(range(n)), []
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"val_fraction {val_fraction} of {n} items leaves no training items")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def fraction_indices(indices: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """A seeded subset of ``indices`` with ceil(len * fraction) items (>= 1), sorted.

    Nested: for one seed, the 5% subset is inside the 25% subset, inside 100% (data-efficiency
    curves then differ only in how many labels they add).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    indices = list(indices)
    if not indices:
        raise ValueError("fraction_indices: no indices to choose from")
    k = max(1, math.ceil(len(indices) * fraction - 1e-9))
    perm = np.random.default_rng(seed).permutation(len(indices))
    return sorted(indices[int(j)] for j in perm[:k])
