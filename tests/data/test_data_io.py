"""Tests for affmae.data.io: bit depths, TIFF stacks, colour rules, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from affmae.data.io import ImageError, check_image, image_shape, read_image, read_mask


def _ramp(h=24, w=40, dtype=np.uint8):
    hi = np.iinfo(dtype).max
    return (np.arange(h * w).reshape(h, w) * (hi // (h * w - 1))).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_integer_images_scale_by_dtype(tmp_path, dtype, fmt):
    arr = _ramp(dtype=dtype)
    arr[0, 0], arr[-1, -1] = 0, np.iinfo(dtype).max
    path = tmp_path / f"img.{fmt}"
    if fmt == "png":
        Image.fromarray(arr).save(path)
    else:
        tifffile.imwrite(path, arr)
    out = read_image(path)
    expected = arr.astype(np.float64) / np.iinfo(dtype).max
    assert out.dtype == np.float32 and out.shape == (1, 24, 40), f"got {out.dtype} {out.shape}"
    err = np.abs(out[0] - expected).max()
    assert err < 1e-6, f"{fmt} {dtype.__name__}: max error {err} against x / dtype max"
    assert out.min() == 0.0 and out.max() == 1.0, f"range {out.min()}..{out.max()} is not [0, 1]"
    assert image_shape(path) == (1, 24, 40), f"image_shape {image_shape(path)}"


def test_signed_ints_map_full_range_and_jpeg_reads(tmp_path):
    arr = np.array([[-32768, 0, 32767]], dtype=np.int16)
    tifffile.imwrite(tmp_path / "s.tif", arr)
    out = read_image(tmp_path / "s.tif")[0, 0]
    assert out[0] == 0.0 and out[2] == 1.0 and abs(out[1] - 32768 / 65535) < 1e-6, f"int16 -> {out}"
    Image.fromarray(_ramp()).save(tmp_path / "j.jpg", quality=95)
    out = read_image(tmp_path / "j.jpg")
    assert out.shape == (1, 24, 40) and 0 <= out.min() and out.max() <= 1, f"jpeg {out.shape}"


def test_float_tiff_kept_and_non_finite_rejected(tmp_path):
    arr = np.array([[-2.5, 0.0, 7.25]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", arr)
    out = read_image(tmp_path / "f.tif")
    assert np.array_equal(out[0], arr), f"float TIFF changed: {out[0]} vs {arr}"
    arr[0, 1] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", arr)
    with pytest.raises(ImageError, match=r"nan\.tif.*non-finite"):
        read_image(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match=r"nan\.tif.*non-finite"):
        check_image(tmp_path / "nan.tif")  # the header check decodes float files


def test_multipage_tiff_stack_gives_pages(tmp_path):
    stack = np.stack([np.full((16, 24), 1000 * (k + 1), np.uint16) for k in range(4)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    out = read_image(path)
    assert out.shape == (4, 16, 24), f"stack read as {out.shape}"
    assert np.allclose(out[:, 0, 0], (np.arange(4) + 1) * 1000 / 65535), f"page values {out[:, 0, 0]}"
    assert image_shape(path) == (4, 16, 24), f"image_shape {image_shape(path)}"
    for k in range(4):
        page = read_image(path, page=k)
        assert page.shape == (1, 16, 24) and np.array_equal(page[0], out[k]), f"page {k} differs"
    with pytest.raises(ImageError, match=r"stack\.tif.*page 4 out of range"):
        read_image(path, page=4)
    # Series appended one by one and ImageJ hyperstacks flatten to pages too.
    tifffile.imwrite(tmp_path / "app.tif", stack[0])
    tifffile.imwrite(tmp_path / "app.tif", stack[1], append=True)
    assert read_image(tmp_path / "app.tif").shape == (2, 16, 24)
    tifffile.imwrite(tmp_path / "ij.tif", stack.reshape(2, 2, 16, 24), imagej=True, metadata={"axes": "ZCYX"})
    assert image_shape(tmp_path / "ij.tif") == (4, 16, 24)
    assert np.array_equal(read_image(tmp_path / "ij.tif", page=3)[0], out[3]), "ImageJ page 3 differs"


def test_rgb_with_equal_channels_accepted_else_error(tmp_path):
    gray = _ramp()
    opaque = np.full_like(gray, 255)
    for name, arr in [("rgb.png", np.stack([gray] * 3, -1)), ("rgba.png", np.stack([gray] * 3 + [opaque], -1))]:
        Image.fromarray(arr).save(tmp_path / name)
        out = read_image(tmp_path / name)
        assert np.array_equal(out[0], gray / np.float32(255)), f"{name} differs from its gray channel"
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([gray] * 3, -1), photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "rgb.tif")[0], gray / np.float32(255)), "RGB TIFF"
    colour = np.stack([gray, gray, 255 - gray], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ImageError, match=r"colour\.png.*3 colour channels that differ"):
        read_image(tmp_path / "colour.png")
    with pytest.raises(ImageError, match=r"colour\.png.*3 colour channels that differ"):
        check_image(tmp_path / "colour.png")  # the header check decodes colour files


def test_masks_keep_values_and_accept_rgba(tmp_path):
    labels = np.zeros((10, 12), np.uint8)
    labels[2:5, 3:9] = 255
    labels[7:, :4] = 128
    rgba = np.stack([labels] * 3 + [np.full_like(labels, 255)], -1)
    Image.fromarray(rgba).save(tmp_path / "m.png")
    m = read_mask(tmp_path / "m.png")
    assert m.dtype == np.int64 and np.array_equal(m, labels), f"mask values {np.unique(m)}"
    tifffile.imwrite(tmp_path / "m16.tif", labels.astype(np.uint16) * 100)
    assert np.array_equal(read_mask(tmp_path / "m16.tif"), labels.astype(np.int64) * 100), "16-bit mask"
    bad = rgba.copy()
    bad[0, 0, 1] = 7
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(ImageError, match=r"bad\.png.*differ"):
        read_mask(tmp_path / "bad.png")


def test_empty_corrupt_and_truncated_files_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.tif").write_bytes(b"this is not an image at all" * 10)
    Image.fromarray(_ramp(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    stack = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "full.tif", stack, photometric="minisblack")
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[:-5000])
    Image.fromarray(_ramp(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    # Truncation is worded per format; the file name is what must be there.
    cases = {"empty.png": "empty", "junk.tif": "cannot be read", "trunc.png": "", "trunc.tif": "",
             "trunc.jpg": ""}
    for name, problem in cases.items():
        for fn in (read_image, image_shape):
            with pytest.raises(ImageError) as info:
                fn(tmp_path / name)
            msg = str(info.value)
            assert str(tmp_path / name) in msg and problem in msg, f"{fn.__name__}({name}) said: {msg}"
    with pytest.raises(ImageError, match=r"nothing\.png.*does not exist"):
        read_image(tmp_path / "nothing.png")
