"""Reading grayscale microscopy images and label masks (PNG, JPEG, TIFF incl. stacks and 16-bit).

Paper: AFFMAE pretrains on grayscale EM scans normalised with dataset statistics (Sec. 5, "Minimal
augmentation (Resize, Normalization)"); this module turns a file into float pixels in [0, 1] so the
statistics are comparable across bit depths. Issue 2 asks that unreadable, empty or odd files give
an error naming the file before training starts; every failure here is an :class:`ImageError` whose
message starts with the path.

Conventions (deliberate decisions):
* Images come back as float32 ``(pages, H, W)``. A PNG/JPEG has one page; a TIFF has one page per
  2-D plane: every axis other than Y, X (and samples S) is flattened into pages in file order, and
  several series of the same plane size (e.g. files written with ``append=True``) are concatenated.
* Scaling by dtype, never by content (so a dim image stays dim): uint8 / 255, uint16 / 65535, other
  unsigned ints / their max; signed ints map their full range [min, max] linearly onto [0, 1]
  (so int16 0 -> about 0.5); bool -> {0, 1}. Float images (TIFF) are kept as stored, not rescaled,
  and must be finite.
* Colour: RGB(A) is accepted only when R = G = B (alpha ignored); otherwise ImageError "has 3 colour
  channels that differ; convert to grayscale". No silent luminance conversion: a colour image in an
  EM archive is more likely a figure or overlay than data. Palette images are expanded through the
  palette and then follow the same rule; gray+alpha keeps the gray channel.
* Masks keep raw label values (int64, no scaling). PNG palette masks ("P" mode) keep the palette
  index as the label value (the PASCAL VOC convention). Float masks must hold whole numbers.
* Hidden failures are not tolerated: Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off, so a truncated
  file is an error, not a partly grey image.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageError",
    "check_image",
    "image_shape",
    "read_image",
    "read_mask",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_TIFF_SUFFIXES = (".tif", ".tiff")

# Exceptions the decoders raise on bad files; anything else is a bug and propagates unchanged.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    KeyError,
    IndexError,
    TypeError,
    MemoryError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
    tifffile.TiffFileError,
)


class ImageError(ValueError):
    """A file that cannot be used as an image or mask; the message starts with the file path."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------------------------
# Helpers shared by image and mask reading
# --------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    """Existence, kind, size and suffix checks that need no decoding."""
    if not path.exists():
        raise ImageError(path, "file does not exist")
    if not path.is_file():
        raise ImageError(path, "is not a regular file")
    if path.stat().st_size == 0:
        raise ImageError(path, "is empty (0 bytes)")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageError(path, f"unsupported suffix {path.suffix!r}; supported: {IMAGE_SUFFIXES}")


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in _TIFF_SUFFIXES


def _gray_from_channels(path: Path, arr: np.ndarray, what: str) -> np.ndarray:
    """(..., S) -> (...): accept 1 channel, gray+alpha, or RGB(A) with R = G = B."""
    s = arr.shape[-1]
    if s in (1, 2):  # gray, gray + alpha
        return arr[..., 0]
    if s in (3, 4):  # RGB, RGBA
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            diff = np.abs(rgb.astype(np.float64) - rgb[..., :1].astype(np.float64)).max()
            raise ImageError(
                path,
                f"{what} has 3 colour channels that differ (largest difference {diff:g}); "
                "convert to grayscale",
            )
        return rgb[..., 0]
    raise ImageError(path, f"{what} has {s} channels per pixel; expected 1 (gray), 3 or 4 (RGB(A) with R=G=B)")


# --------------------------------------------------------------------------------------------
# TIFF: layout from the header, then planes
# --------------------------------------------------------------------------------------------


class _LogErrors(logging.Handler):
    """Collects ERROR records: tifffile logs (rather than raises) a broken IFD chain and goes on."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []
        self.thread = threading.get_ident()  # only this thread's reads count

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _open_tiff(path: Path):
    """TiffFile with every IFD loaded; a damaged page chain (e.g. a truncated stack) is an error."""
    handler = _LogErrors()
    log = logging.getLogger("tifffile")
    log.addHandler(handler)
    try:
        with tifffile.TiffFile(path) as tif:
            len(tif.pages)  # walks the whole IFD chain
            if handler.messages:
                raise ImageError(path, f"is damaged or truncated (tifffile: {handler.messages[0]})")
            yield tif
            if handler.messages:
                raise ImageError(path, f"is damaged or truncated (tifffile: {handler.messages[0]})")
    finally:
        log.removeHandler(handler)


def _tiff_series(path: Path, tif: tifffile.TiffFile) -> list:
    """The series that hold image planes; all must share one plane size."""
    series = [s for s in tif.series if s.size > 0]
    if not series:
        raise ImageError(path, "TIFF holds no image data")
    planes = {_tiff_plane_shape(path, s) for s in series}
    if len(planes) > 1:
        raise ImageError(
            path, f"TIFF holds {len(series)} image series of different sizes {sorted(planes)}; "
            "split it into one file per size"
        )
    return series


def _tiff_plane_shape(path: Path, series) -> tuple[int, int]:
    axes = series.axes
    if "Y" not in axes or "X" not in axes:
        raise ImageError(path, f"TIFF series has axes {axes!r} without Y and X")
    return series.shape[axes.index("Y")], series.shape[axes.index("X")]


def _tiff_pages(series) -> int:
    """Number of 2-D planes in a series: product of all axes except Y, X and samples S."""
    n = 1
    for ax, length in zip(series.axes, series.shape):
        if ax not in "YXS":
            n *= length
    return n


def _tiff_planes(path: Path, arr: np.ndarray, axes: str, photometric, what: str, mask: bool) -> np.ndarray:
    """Decoded TIFF data with tifffile ``axes`` -> (pages, H, W) in the stored dtype."""
    if "S" in axes:
        # Samples last, then decide: RGB must be gray, other extra samples (alpha) are dropped.
        arr = np.moveaxis(arr, axes.index("S"), -1)
        axes = axes.replace("S", "")
        if photometric == tifffile.PHOTOMETRIC.RGB:
            arr = _gray_from_channels(path, arr, what)
        else:
            arr = arr[..., 0]
    if photometric == tifffile.PHOTOMETRIC.PALETTE and not mask:
        raise ImageError(path, f"{what} is a palette (colour-mapped) TIFF; save it as grayscale")
    # Y, X last, everything else flattened into pages in file order.
    order = [i for i, a in enumerate(axes) if a not in "YX"] + [axes.index("Y"), axes.index("X")]
    arr = np.transpose(arr, order)
    h, w = arr.shape[-2:]
    return arr.reshape(-1, h, w)  # (pages, H, W)


def _read_tiff(path: Path, what: str, mask: bool, page: int | None) -> np.ndarray:
    with _open_tiff(path) as tif:
        series = _tiff_series(path, tif)
        if page is None:
            return np.concatenate(
                [_tiff_planes(path, s.asarray(), s.axes, s.keyframe.photometric, what, mask) for s in series]
            )
        _check_page(path, page, sum(_tiff_pages(s) for s in series))
        for s in series:
            n = _tiff_pages(s)
            if page >= n:
                page -= n
                continue
            kf = s.keyframe
            ifds = s.pages
            if n > 1 and len(ifds) == n and ifds[page] is not None:
                # One IFD per plane (plain stacks, ImageJ hyperstacks): decode only that IFD.
                return _tiff_planes(path, ifds[page].asarray(), kf.axes, kf.photometric, what, mask)
            # One plane, or planes packed differently: decode the series.
            return _tiff_planes(path, s.asarray(), s.axes, kf.photometric, what, mask)[page : page + 1]
        raise AssertionError("unreachable: page was range-checked")


def _tiff_header(path: Path) -> tuple[int, int, int]:
    """(pages, H, W) from the TIFF header; also checks every strip/tile lies inside the file."""
    size = path.stat().st_size
    with _open_tiff(path) as tif:
        series = _tiff_series(path, tif)
        pages = sum(_tiff_pages(s) for s in series)
        h, w = _tiff_plane_shape(path, series[0])
        # A truncated TIFF keeps its header; the data offsets then point past the end of the file.
        for p in tif.pages:
            for off, cnt in zip(p.dataoffsets, p.databytecounts):
                if off + cnt > size:
                    raise ImageError(
                        path, f"is truncated: page data ends at byte {off + cnt} but the file has {size} bytes"
                    )
    return pages, h, w


# --------------------------------------------------------------------------------------------
# Pillow formats (PNG, JPEG)
# --------------------------------------------------------------------------------------------


def _pil_array(path: Path, what: str, mask: bool) -> np.ndarray:
    """Decode a PNG/JPEG -> (H, W) array in its natural dtype, colour resolved."""
    with Image.open(path) as im:
        mode = im.mode
        if mode == "P" and mask:
            arr = np.asarray(im)  # palette index is the label value
        elif mode == "P" or mode == "PA":
            arr = np.asarray(im.convert("RGBA"))
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            arr = np.asarray(im.convert("RGB"))
        else:
            arr = np.asarray(im)
    if arr.ndim == 3:
        arr = _gray_from_channels(path, arr, what)
    if arr.ndim != 2:
        raise ImageError(path, f"{what} decodes to shape {arr.shape}; expected (H, W)")
    if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        # Pillow may open 16-bit PNGs as 32-bit "I"; the PNG format has no 32-bit gray.
        arr = arr.astype(np.uint16)
    return arr


def _pil_header(path: Path) -> tuple[int, int, int]:
    """(1, H, W) from the header; PNG chunk CRCs are verified (catches truncation and bit flips)."""
    with Image.open(path) as im:
        w, h = im.size
        fmt = im.format
        im.verify()
    if fmt == "JPEG":
        # JPEG has no checksum; a truncated file lacks its end-of-image marker (FF D9).
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            if b"\xff\xd9" not in f.read():
                raise ImageError(path, "is truncated: JPEG end-of-image marker missing")
    return 1, h, w


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_page(path: Path, page: int, pages: int) -> None:
    if not 0 <= page < pages:
        raise ImageError(path, f"page {page} out of range; the file has {pages} page(s)")


def _read_raw(path: Path, what: str, mask: bool, page: int | None) -> np.ndarray:
    """(pages, H, W) raw values; every decoder failure becomes an ImageError naming the file."""
    _check_file(path)
    try:
        if _is_tiff(path):
            arr = _read_tiff(path, what, mask, page)
        else:
            arr = _pil_array(path, what, mask)[None]  # (1, H, W)
            if page is not None:
                _check_page(path, page, 1)
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageError(path, f"cannot be read as an image ({type(e).__name__}: {e})") from e
    if arr.size == 0:
        raise ImageError(path, f"{what} has zero size (shape {arr.shape})")
    return arr


def _to_unit_float(path: Path, arr: np.ndarray) -> np.ndarray:
    """Scale by dtype (see module docstring) -> float32."""
    dt = arr.dtype
    if dt == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(dt, np.unsignedinteger):
        return (arr.astype(np.float64) / np.iinfo(dt).max).astype(np.float32)
    if np.issubdtype(dt, np.signedinteger):
        info = np.iinfo(dt)
        return ((arr.astype(np.float64) - info.min) / (float(info.max) - info.min)).astype(np.float32)
    if np.issubdtype(dt, np.floating):
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise ImageError(path, f"float image has {bad} non-finite (NaN/inf) pixel(s)")
        return out
    raise ImageError(path, f"unsupported pixel type {dt}")


def read_image(path: str | os.PathLike, page: int | None = None) -> np.ndarray:
    """Read a grayscale image as float32 ``(pages, H, W)``, integers scaled to [0, 1].

    ``page``: decode only that page (TIFF stacks: only its series) and return ``(1, H, W)``.
    Raises :class:`ImageError` naming the file for empty, corrupt, truncated, colour or
    non-finite images.
    """
    path = Path(path)
    return _to_unit_float(path, _read_raw(path, "image", mask=False, page=page))


def read_mask(path: str | os.PathLike, page: int | None = None) -> np.ndarray:
    """Read a label mask as int64 ``(H, W)`` of raw label values (no scaling).

    RGB(A) masks are accepted when R = G = B. A multi-page mask needs ``page``; without it the file
    must hold exactly one page.
    """
    path = Path(path)
    arr = _read_raw(path, "mask", mask=True, page=page)
    if page is None and arr.shape[0] != 1:
        raise ImageError(path, f"mask has {arr.shape[0]} pages; pass page= to pick one")
    arr = arr[0]
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise ImageError(path, "float mask holds values that are not whole numbers")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ImageError(path, f"unsupported mask pixel type {arr.dtype}")
    return arr.astype(np.int64)


def image_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(pages, H, W)`` from the file header, without decoding pixels.

    Also a cheap integrity check: empty files, unknown formats, truncated TIFF/JPEG files and (for
    PNG) any chunk with a bad CRC raise :class:`ImageError`. It cannot see colour content; use
    :func:`check_image` for a full check.
    """
    path = Path(path)
    _check_file(path)
    try:
        pages, h, w = _tiff_header(path) if _is_tiff(path) else _pil_header(path)
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageError(path, f"cannot be read as an image ({type(e).__name__}: {e})") from e
    if pages == 0 or h == 0 or w == 0:
        raise ImageError(path, f"image has zero size (pages, H, W) = {(pages, h, w)}")
    return pages, h, w


def _header_channels(path: Path) -> int:
    """Colour channels the header announces (1 for gray); for deciding whether to decode."""
    if _is_tiff(path):
        with _open_tiff(path) as tif:
            kf = tif.series[0].keyframe
            return 3 if kf.photometric == tifffile.PHOTOMETRIC.RGB else 1
    with Image.open(path) as im:
        return 1 if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;") else 3


def check_image(path: str | os.PathLike, full: bool = False) -> tuple[int, int, int]:
    """Validate an image and return ``(pages, H, W)``.

    ``full=False``: header check (:func:`image_shape`), plus a full decode when the header announces
    colour, palette or float data (R = G = B and finiteness can only be seen in the pixels).
    ``full=True``: decode every page. Raises :class:`ImageError` naming the file.
    """
    path = Path(path)
    shape = image_shape(path)
    needs_pixels = full
    if not needs_pixels:
        try:
            needs_pixels = _header_channels(path) != 1 or _is_float_tiff(path)
        except _DECODE_ERRORS as e:
            raise ImageError(path, f"cannot be read as an image ({type(e).__name__}: {e})") from e
    if needs_pixels:
        arr = read_image(path)
        if arr.shape != shape:
            raise ImageError(path, f"header says shape {shape} but pixels decode to {arr.shape}")
    return shape


def _is_float_tiff(path: Path) -> bool:
    if not _is_tiff(path):
        return False
    with _open_tiff(path) as tif:
        return tif.series[0].dtype.kind == "f"
