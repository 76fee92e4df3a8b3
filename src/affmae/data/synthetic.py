"""Synthetic EM-like images with per-pixel labels, for the demo and the tests.

Issue 2 asks for a built-in generator of electron-microscopy-like images (cells with membranes,
organelles, texture and noise) with class labels, so the whole pipeline runs without real data.
It is not from the paper; it stands in for the paper's EM sets (Sec. 5) at toy scale.

What an image holds (all sizes in pixels, independent of the image size):
1. Cells: a Voronoi tessellation of a jittered grid of seeds (cell diameter 28-48 px) computed in
   coordinates warped by a smooth random field, so walls bend. Walls are dark membranes (class 1)
   whose thickness varies from wall to wall (1.6-3.4 px).
2. Mitochondria (class 2): ellipses (semi-axes 6-12 by 3.5-6 px) inside one cell and away from its
   wall, with a dark rim, a mid-grey matrix and darker cristae stripes across the long axis.
3. Distractors labelled cytoplasm (class 0), which keep the task from being a threshold: small
   vesicles with dark rims (as dark as membranes) and dark granules.
4. Cytoplasm texture (smooth noise), per-cell brightness, smooth illumination variation, a Gaussian
   blur (the microscope's point spread), then Gaussian noise and per-image contrast.

Everything is vectorised over a chunk of images; each image draws from its own generator seeded
by (seed, index), so image i is the same whatever n or the chunking. Cost: about 0.3 s for 64
images of 128 x 128 on one CPU core.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

__all__ = ["CLASS_NAMES", "generate", "write_dataset"]

CLASS_NAMES = ("cytoplasm", "membrane", "mitochondrion")
CYTOPLASM, MEMBRANE, MITOCHONDRION = 0, 1, 2

# Nearest seeds are searched in the 3 x 3 grid cells around a pixel: with jitter <= 0.3 spacing the
# two nearest seeds always lie there (own and corner neighbours <= 1.13 spacing away, anything
# further >= 1.2). Seeds extend _MARGIN cells beyond each border to cover the warp and the window.
_WINDOW = 1
_MARGIN = 3
_CHUNK_ELEMENTS = 6_000_000  # (images x H x W x candidates) per chunk, bounds memory (~100 MB)


def _gaussian_filter(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Periodic Gaussian blur of (c, H, W) with a per-image sigma (c,), through the FFT."""
    h, w = x.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2.0 * np.pi**2 * sigma[:, None, None] ** 2 * (fy**2 + fx**2))  # (c, H, W//2+1)
    return np.fft.irfft2(np.fft.rfft2(x) * kernel, s=(h, w)).astype(np.float32)


def _smooth_noise(white: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """White noise (c, H, W) -> smooth field with zero mean and unit std per image."""
    f = _gaussian_filter(white, sigma)
    f -= f.mean(axis=(-2, -1), keepdims=True)
    return f / (f.std(axis=(-2, -1), keepdims=True) + 1e-8)


def _hash01(a: np.ndarray, b: np.ndarray | float = 0.0) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer (pair); cheap and vectorised."""
    v = np.sin(a.astype(np.float64) * 12.9898 + np.asarray(b, dtype=np.float64) * 78.233) * 43758.5453
    return (v - np.floor(v)).astype(np.float32)


def _draw(seed: int, index: int, h: int, w: int, gy: int, gx: int, n_mito: int, n_ves: int) -> dict:
    """All random numbers of one image, from its own generator (independent of chunking)."""
    rng = np.random.default_rng([seed, index])
    spacing = rng.uniform(28.0, 48.0)
    return {
        "spacing": spacing,
        "jitter": rng.uniform(-0.3, 0.3, size=(gy, gx, 2)).astype(np.float32),
        "warp": rng.standard_normal((2, h, w)).astype(np.float32),
        "warp_amp": rng.uniform(2.0, 5.0),
        "thick": rng.uniform(1.6, 2.4),
        "salt": rng.integers(1, 4096),
        "mito_n": min(n_mito, rng.poisson(h * w / 40.0**2)),
        "mito": rng.uniform(size=(n_mito, 5)).astype(np.float32),  # cy, cx, a, b, angle in [0, 1)
        "cristae": rng.uniform(3.0, 4.5),
        "ves_n": min(n_ves, rng.poisson(h * w / 30.0**2)),
        "ves": rng.uniform(size=(n_ves, 3)).astype(np.float32),  # cy, cx, r in [0, 1)
        "texture": rng.standard_normal((h, w)).astype(np.float32),
        "granules": rng.uniform(size=(h, w)).astype(np.float32),
        "illum": rng.standard_normal((h, w)).astype(np.float32),
        "blur": rng.uniform(0.6, 1.1),
        "noise_std": rng.uniform(0.03, 0.06),
        "noise": rng.standard_normal((h, w)).astype(np.float32),
        "gain": rng.uniform(0.85, 1.15),
        "offset": rng.uniform(-0.05, 0.05),
    }


def _stamp(h, w, cy, cx, a, b, ang, valid, radius):
    """Pixels covered by ellipses, without touching the rest of the image.

    Each ellipse (c, E) is evaluated on a (2 * radius + 1)^2 window around its centre. Returns flat
    pixel index into (c, H, W), normalised radius rho < 1, coordinate along the long axis u, and the
    ellipse number; entries sorted by (pixel, rho), so the first entry of a pixel is its nearest
    ellipse.
    """
    c, e = cy.shape
    o = np.arange(-radius, radius + 1, dtype=np.float32)
    py = np.round(cy)[..., None, None] + o[:, None]  # (c, E, S, 1)
    px = np.round(cx)[..., None, None] + o[None, :]  # (c, E, 1, S)
    dy, dx = py - cy[..., None, None], px - cx[..., None, None]
    cos, sin = np.cos(ang)[..., None, None], np.sin(ang)[..., None, None]
    u = dx * cos + dy * sin  # (c, E, S, S) along the long axis
    v = -dx * sin + dy * cos
    rho = np.sqrt((u / a[..., None, None]) ** 2 + (v / b[..., None, None]) ** 2)
    keep = (rho < 1.0) & valid[..., None, None] & (py >= 0) & (py < h) & (px >= 0) & (px < w)
    bi = np.broadcast_to(np.arange(c)[:, None, None, None], keep.shape)[keep]
    ei = np.broadcast_to(np.arange(e)[None, :, None, None], keep.shape)[keep]
    flat = bi * (h * w) + np.broadcast_to(py, keep.shape)[keep].astype(np.int64) * w
    flat = flat + np.broadcast_to(px, keep.shape)[keep].astype(np.int64)
    rho, u = rho[keep], u[keep]
    order = np.lexsort((rho, flat))
    return flat[order], rho[order], u[order], ei[order]


def _first_per_pixel(flat: np.ndarray, *values: np.ndarray):
    """Keep the first entry of every pixel (entries sorted by pixel)."""
    first = np.ones(flat.shape, bool)
    first[1:] = flat[1:] != flat[:-1]
    return (flat[first],) + tuple(v[first] for v in values)


def _chunk(seed: int, indices: range, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    c = len(indices)
    gy, gx = int(np.ceil(h / 28.0)) + 2 * _MARGIN, int(np.ceil(w / 28.0)) + 2 * _MARGIN
    n_mito = max(1, int(3 * h * w / 40.0**2) + 2)
    n_ves = max(1, int(3 * h * w / 30.0**2) + 2)
    draws = [_draw(seed, i, h, w, gy, gx, n_mito, n_ves) for i in indices]
    stack = lambda key: np.stack([d[key] for d in draws])  # noqa: E731
    col = lambda key: np.array([d[key] for d in draws], dtype=np.float32)  # noqa: E731

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # 1. Cells: warped coordinates, nearest two seeds of a jittered grid among the 3 x 3 cells.
    s = col("spacing")[:, None, None]  # (c, 1, 1)
    warp = _smooth_noise(stack("warp").reshape(c * 2, h, w), np.full(c * 2, 10.0)).reshape(c, 2, h, w)
    wy = yy[None] + col("warp_amp")[:, None, None] * warp[:, 0]  # (c, H, W)
    wx = xx[None] + col("warp_amp")[:, None, None] * warp[:, 1]
    iy, ix = np.mgrid[0:gy, 0:gx].astype(np.float32)
    jit = stack("jitter")  # (c, gy, gx, 2)
    seed_y = ((iy - _MARGIN + 0.5 + jit[..., 0]) * s).reshape(-1)  # (c * gy * gx,) seed positions
    seed_x = ((ix - _MARGIN + 0.5 + jit[..., 1]) * s).reshape(-1)
    # Own grid cell (clipped so the 3 x 3 window stays on the grid), then the window's 9 cells.
    base_y = np.clip(np.floor(wy / s).astype(np.int32) + _MARGIN, _WINDOW, gy - 1 - _WINDOW)
    base_x = np.clip(np.floor(wx / s).astype(np.int32) + _MARGIN, _WINDOW, gx - 1 - _WINDOW)
    g = np.arange(-_WINDOW, _WINDOW + 1, dtype=np.int32)
    offset = (g[:, None] * gx + g[None, :]).reshape(-1)  # (9,)
    first = (np.arange(c, dtype=np.int32) * (gy * gx))[:, None, None]
    cells = (first + base_y * gx + base_x)[..., None] + offset  # (c, H, W, 9) flat seed index
    d2 = (wy[..., None] - seed_y[cells]) ** 2 + (wx[..., None] - seed_x[cells]) ** 2
    i1 = d2.argmin(axis=-1)[..., None]
    d_1 = np.take_along_axis(d2, i1, -1)[..., 0]
    np.put_along_axis(d2, i1, np.inf, -1)
    i2 = d2.argmin(axis=-1)[..., None]
    d_2 = np.take_along_axis(d2, i2, -1)[..., 0]
    cell = np.take_along_axis(cells, i1, -1)[..., 0]  # (c, H, W) nearest seed = cell id
    other = np.take_along_axis(cells, i2, -1)[..., 0]
    a_y, a_x, b_y, b_x = seed_y[cell], seed_x[cell], seed_y[other], seed_x[other]
    # Per-image cell ids, salted, so per-cell randomness does not depend on the chunking.
    salt = np.array([d["salt"] for d in draws], np.int64)[:, None, None] * (gy * gx)
    cell, other = cell - first + salt, other - first + salt
    # Distance to the bisector of the two nearest seeds = distance to the cell wall.
    sep = np.sqrt((a_y - b_y) ** 2 + (a_x - b_x) ** 2) + 1e-6
    wall = (d_2 - d_1) / (2.0 * sep)
    half = 0.5 * (col("thick")[:, None, None] + 1.0 * _hash01(np.minimum(cell, other), np.maximum(cell, other)))
    membrane = wall < half

    # 2. Mitochondria: ellipses clipped to their host cell and kept off its wall.
    m = stack("mito")  # (c, E, 5)
    m_cy, m_cx = m[..., 0] * (h - 1), m[..., 1] * (w - 1)
    m_a, m_b, m_ang = 6.0 + 6.0 * m[..., 2], 3.5 + 2.5 * m[..., 3], np.pi * m[..., 4]
    valid = np.arange(n_mito)[None] < col("mito_n")[:, None]  # (c, E)
    host = cell[np.arange(c)[:, None], np.round(m_cy).astype(np.int64), np.round(m_cx).astype(np.int64)]
    flat, rho, u, ei = _stamp(h, w, m_cy, m_cx, m_a, m_b, m_ang, valid, radius=12)
    obj = flat // (h * w) * n_mito + ei  # index into (c, E) arrays
    ok = cell.reshape(-1)[flat] == host.reshape(-1)[obj]
    ok &= wall.reshape(-1)[flat] > half.reshape(-1)[flat] + 1.5
    # Drop ellipses that their cell clips by more than 15% (slivers do not look like organelles).
    kept = np.bincount(obj[ok], minlength=c * n_mito) >= 0.85 * np.bincount(obj, minlength=c * n_mito)
    ok &= kept[obj]
    flat, rho, u, obj = _first_per_pixel(flat[ok], rho[ok], u[ok], obj[ok])
    mito = np.zeros(c * h * w, bool)
    mito[flat] = True
    mito = mito.reshape(c, h, w)
    r = np.zeros(c * h * w, np.float32)
    r[flat] = rho
    r = r.reshape(c, h, w)
    cristae = col("cristae").repeat(n_mito)[obj]
    stripes = np.zeros(c * h * w, bool)
    stripes[flat] = np.cos(2 * np.pi * u / cristae) > 0.55
    stripes = stripes.reshape(c, h, w)

    # 3. Vesicles (distractors, class 0): small rings as dark as membranes.
    v = stack("ves")
    v_r = 1.5 + 2.0 * v[..., 2]
    v_valid = np.arange(n_ves)[None] < col("ves_n")[:, None]
    v_cy, v_cx = v[..., 0] * (h - 1), v[..., 1] * (w - 1)
    flat, v_rho, _, _ = _stamp(h, w, v_cy, v_cx, v_r, v_r, np.zeros_like(v_r), v_valid, radius=4)
    flat, v_rho = _first_per_pixel(flat, v_rho)
    ring = np.zeros(c * h * w, np.int8)  # 0 none, 1 lumen, 2 rim
    ring[flat] = np.where(v_rho > 0.6, 2, 1)
    ring = ring.reshape(c, h, w) * (~membrane & ~mito)

    # 4. Intensities, then texture, illumination, blur, noise.
    img = 0.62 + 0.08 * (_hash01(cell, 0.5) - 0.5)  # per-cell cytoplasm brightness
    img = img + 0.035 * _smooth_noise(stack("texture"), np.full(c, 1.5))
    img = img - 0.25 * (stack("granules") < 0.004)
    img = np.where(ring == 2, 0.26, np.where(ring == 1, 0.70, img))
    img = np.where(mito, np.where(r > 0.78, 0.24, np.where(stripes, 0.33, 0.46)), img)
    profile = np.exp(-((wall / np.maximum(half, 1e-3)) ** 2))  # soft dark line, darkest on the wall
    img = img * (1.0 - 0.65 * profile)
    img = img * (1.0 + 0.12 * _smooth_noise(stack("illum"), np.full(c, 0.3 * min(h, w))))
    img = _gaussian_filter(img.astype(np.float32), col("blur"))
    img = img + col("noise_std")[:, None, None] * stack("noise")
    img = (img - 0.5) * col("gain")[:, None, None] + 0.5 + col("offset")[:, None, None]

    labels = np.full((c, h, w), CYTOPLASM, dtype=np.uint8)
    labels[mito] = MITOCHONDRION
    labels[membrane] = MEMBRANE
    images = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return images, labels


def generate(n: int, size: tuple[int, int] = (128, 128), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic EM-like images and labels, both uint8 ``(n, H, W)``.

    Labels: 0 cytoplasm, 1 membrane, 2 mitochondrion (:data:`CLASS_NAMES`). Image i depends only
    on (seed, i, size).
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if n < 0 or h < 8 or w < 8:
        raise ValueError(f"need n >= 0 and size >= 8 x 8, got n={n}, size={(h, w)}")
    images = np.empty((n, h, w), np.uint8)
    labels = np.empty((n, h, w), np.uint8)
    per_chunk = max(1, _CHUNK_ELEMENTS // (h * w * (2 * _WINDOW + 1) ** 2))
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        images[start:stop], labels[start:stop] = _chunk(seed, range(start, stop), h, w)
    return images, labels


def write_dataset(
    out_dir: str | os.PathLike, n: int, size: tuple[int, int] = (128, 128), seed: int = 0
) -> Path:
    """Write ``out_dir/images/NNNN.png``, ``out_dir/masks/NNNN.png`` (value = class index) and
    ``out_dir/classes.yaml`` ({value: name}); returns ``out_dir``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(max(n - 1, 0))))
    h, w = (size, size) if isinstance(size, int) else size
    per_chunk = max(1, _CHUNK_ELEMENTS // (h * w * (2 * _WINDOW + 1) ** 2))
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        images, labels = _chunk(seed, range(start, stop), h, w)
        for k, i in enumerate(range(start, stop)):
            Image.fromarray(images[k]).save(out / "images" / f"{i:0{digits}d}.png")
            Image.fromarray(labels[k]).save(out / "masks" / f"{i:0{digits}d}.png")
    with open(out / "classes.yaml", "w") as f:
        yaml.safe_dump({i: name for i, name in enumerate(CLASS_NAMES)}, f, sort_keys=True)
    return out
