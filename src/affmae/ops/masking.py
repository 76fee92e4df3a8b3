"""Patch masking for MAE pretraining: uniform and Perlin noise, exact ratio (paper 3.4; DESIGN 2.2).

1. A noise field is drawn on the (gh, gw) patch grid, one per image: i.i.d. uniform noise
   (the classic MAE random mask) or Perlin gradient noise (Perlin, 1985), whose blobs hide
   contiguous regions so the model cannot fill a patch by interpolating its neighbours.
2. Each image's field is ranked and the ``num_masked`` highest values are hidden; the lowest
   (1 - r) fraction stays visible. Every image therefore hides exactly the same number of
   patches, whatever the noise, so a batch of visible tokens is a dense (B, Nv, C) tensor.

Perlin noise here (no fixed-size assumption, the trap in DESIGN 7):
    * Lattice period ``scale`` patches; the lattice is sized from the grid (ceil(g / scale) + 2
      points per axis), so any gh, gw works (56, 80, 96, 125 cells, non-square).
    * Random unit gradients at every lattice point and a random sub-cell offset per image, all
      drawn from ``generator``; quintic fade 6t^5 - 15t^4 + 10t^3 between the four corners.
    * "Several Perlin scales" (issue 2): each image draws ONE scale uniformly from ``scales``
      (no octave sum). An image then has one blob size, and the batch mixes sizes. This makes
      ``scales`` directly testable: ``scales=(8,)`` gives larger, smoother blobs than ``(2,)``.
      Scales may be any positive numbers (patches per lattice cell), not only integers.

Deliberate choices the paper leaves open:
    * ``num_masked`` uses Python ``round`` (half to even): round(0.5 * 5) = 2.
    * Random numbers are drawn on the generator's device (CPU when no generator and no device is
      given), then moved to ``device``, where the per-patch work runs; so a CPU generator with
      ``device="cuda"`` works and gives the same random draws as on CPU (Perlin masks then agree
      with CPU ones up to float rounding at the rank threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "make_mask",
    "mask_indices",
    "num_masked",
    "patch_positions",
    "perlin_noise",
    "uniform_noise",
]

MASK_KINDS = ("perlin", "uniform")
DEFAULT_PERLIN_SCALES = (2, 4, 8)


def num_masked(num_patches: int, ratio: float) -> int:
    """Number of hidden patches: round(ratio * num_patches), leaving at least one visible.

    Raises:
        ValueError: ratio outside [0, 1), num_patches < 1, or a ratio so close to 1 that no patch
            would stay visible.
    """
    if isinstance(num_patches, bool) or int(num_patches) != num_patches or num_patches < 1:
        raise ValueError(f"num_patches must be a positive integer, got {num_patches!r}")
    ratio_f = float(ratio)
    if not (0.0 <= ratio_f < 1.0):  # also rejects NaN
        raise ValueError(f"mask ratio must be in [0, 1), got ratio={ratio!r}")
    n = round(ratio_f * int(num_patches))
    if n >= num_patches:
        raise ValueError(
            f"mask ratio={ratio!r} hides all {num_patches} patches (round gives {n}); "
            "at least one patch must stay visible"
        )
    return int(n)


def _check_grid(batch: int, grid_hw: Sequence[int]) -> tuple[int, int, int]:
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if len(grid_hw) != 2:
        raise ValueError(f"grid_hw must be (gh, gw), got {grid_hw!r}")
    gh, gw = grid_hw
    if any(isinstance(g, bool) or int(g) != g or g < 1 for g in (gh, gw)):
        raise ValueError(f"grid_hw must be two positive integers, got {tuple(grid_hw)!r}")
    return int(batch), int(gh), int(gw)


def _devices(generator: torch.Generator | None, device) -> tuple[torch.device, torch.device]:
    """(device to draw random numbers on, device of the result)."""
    if generator is not None:
        draw = generator.device
    else:
        draw = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.device(device) if device is not None else draw
    return draw, out


def uniform_noise(
    batch: int,
    grid_hw: Sequence[int],
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """I.i.d. U[0, 1) noise on the patch grid: (B, gh, gw) float32."""
    B, gh, gw = _check_grid(batch, grid_hw)
    draw, out = _devices(generator, device)
    noise = torch.rand((B, gh, gw), generator=generator, device=draw, dtype=torch.float32)
    return noise.to(out)


def _fade(t: torch.Tensor) -> torch.Tensor:
    # Perlin's improved (quintic) fade: zero first and second derivative at the lattice points.
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    batch: int,
    grid_hw: Sequence[int],
    scales: Sequence[float] = DEFAULT_PERLIN_SCALES,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Perlin gradient noise on the patch grid, one random scale per image: (B, gh, gw) float32.

    Args:
        batch: B images.
        grid_hw: (gh, gw) patch grid; any positive sizes.
        scales: candidate lattice periods in patches; each image draws one uniformly.
        generator: source of the scale choice, lattice gradients and sub-cell offsets.
        device: device of the result (see module docstring).
    Returns:
        (B, gh, gw) float32, values in about [-0.7, 0.7], zero mean over the lattice.
    """
    B, gh, gw = _check_grid(batch, grid_hw)
    scale_list = [float(s) for s in scales]
    if not scale_list or any(not math.isfinite(s) or s <= 0 for s in scale_list):
        raise ValueError(f"Perlin scales must be a non-empty list of positive numbers, got {scales!r}")
    draw, out = _devices(generator, device)

    # 1. Per-image scale, sub-cell offset (lattice units) and unit gradients on a lattice large
    #    enough for the smallest scale. Only these small draws use the generator's device; the
    #    per-patch work below runs on the output device.
    s_min = min(scale_list)
    ly = math.ceil(gh / s_min) + 2
    lx = math.ceil(gw / s_min) + 2
    choice = torch.randint(len(scale_list), (B,), generator=generator, device=draw)
    offset = torch.rand((B, 2), generator=generator, device=draw)  # (B, 2) as (x, y)
    angle = torch.rand((B, ly * lx), generator=generator, device=draw) * (2.0 * math.pi)
    scale = torch.tensor(scale_list, dtype=torch.float32, device=draw)[choice].to(out)  # (B,)
    offset = offset.to(out)
    gx = torch.cos(angle).to(out)  # (B, ly*lx) gradient x of each lattice point, raster order
    gy = torch.sin(angle).to(out)

    # 2. Lattice coordinates of the patch centres; separable, so kept as a row and a column:
    #    u = (col + 0.5) / scale + offset_x, v = (row + 0.5) / scale + offset_y.
    col = torch.arange(gw, device=out, dtype=torch.float32) + 0.5
    row = torch.arange(gh, device=out, dtype=torch.float32) + 0.5
    u = col.view(1, 1, gw) / scale.view(B, 1, 1) + offset[:, 0].view(B, 1, 1)  # (B, 1, gw)
    v = row.view(1, gh, 1) / scale.view(B, 1, 1) + offset[:, 1].view(B, 1, 1)  # (B, gh, 1)
    iu = u.floor()
    iv = v.floor()
    fu = u - iu  # position inside the lattice cell, [0, 1)
    fv = v - iv
    base = (iv.long() * lx + iu.long()).view(B, gh * gw)  # (B, gh*gw) lattice index of corner 00

    # 3. Dot product of each corner's gradient with the offset from that corner.
    def corner(dx: int, dy: int) -> torch.Tensor:
        idx = base + (dy * lx + dx)
        cx = torch.gather(gx, 1, idx).view(B, gh, gw)
        cy = torch.gather(gy, 1, idx).view(B, gh, gw)
        return cx * (fu - dx) + cy * (fv - dy)  # (B, gh, gw)

    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)

    # 4. Faded bilinear blend of the four corner values.
    wu = _fade(fu)  # (B, 1, gw)
    wv = _fade(fv)  # (B, gh, 1)
    top = torch.lerp(n00, n10, wu)
    bottom = torch.lerp(n01, n11, wu)
    return torch.lerp(top, bottom, wv)


def make_mask(
    batch: int,
    grid_hw: Sequence[int],
    ratio: float,
    kind: str = "perlin",
    scales: Sequence[float] = DEFAULT_PERLIN_SCALES,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Exact-ratio patch mask: (B, gh*gw) bool ``is_masked`` in raster order (row * gw + col).

    Every image hides exactly ``num_masked(gh * gw, ratio)`` patches: the highest values of its
    noise field. ``scales`` is used by ``kind="perlin"`` only (uniform noise has no scale).

    Raises:
        ValueError: unknown ``kind``, bad ratio (see ``num_masked``) or grid.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind={kind!r}; expected one of {MASK_KINDS}")
    B, gh, gw = _check_grid(batch, grid_hw)
    n_mask = num_masked(gh * gw, ratio)
    if kind == "perlin":
        noise = perlin_noise(B, (gh, gw), scales=scales, generator=generator, device=device)
    else:
        noise = uniform_noise(B, (gh, gw), generator=generator, device=device)
    noise = noise.view(B, gh * gw)  # (B, N) raster order
    hide = torch.topk(noise, n_mask, dim=1, largest=True, sorted=False).indices  # (B, Nm)
    is_masked = torch.zeros((B, gh * gw), dtype=torch.bool, device=noise.device)
    is_masked.scatter_(1, hide, True)
    return is_masked


def mask_indices(is_masked: torch.Tensor,
                 num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a mask into index lists: (visible_idx (B, Nv), masked_idx (B, Nm)), int64, ascending.

    Args:
        is_masked: (B, N) bool, True = hidden; every image hides the same number of patches.
        num_masked: that number when the caller knows it (``num_masked(N, ratio)``): skips the
            count check, which reads the mask back to the host (a device sync that also stops
            CUDA-graph capture). Left None, the count is read and checked.
    Raises:
        ValueError: ``is_masked`` not a 2-D bool tensor, or images hiding different counts.
    """
    if is_masked.dtype != torch.bool or is_masked.dim() != 2:
        raise ValueError(
            f"is_masked must be a (B, N) bool tensor, got dtype={is_masked.dtype} "
            f"shape={tuple(is_masked.shape)}"
        )
    B, N = is_masked.shape
    n_mask = num_masked
    if n_mask is None:
        counts = is_masked.sum(dim=1).tolist()  # one host sync
        n_mask = counts[0] if B > 0 else 0
        if any(c != n_mask for c in counts):
            raise ValueError(
                f"every image must hide the same number of patches, got per-image counts {counts}"
            )
    elif not 0 <= n_mask <= N:
        raise ValueError(f"num_masked={n_mask} is outside [0, {N}]")
    # A stable sort of the 0/1 flags lists visible (0) then masked (1) indices, each ascending.
    order = torch.sort(is_masked.to(torch.uint8), dim=1, stable=True).indices  # (B, N)
    return order[:, : N - n_mask].contiguous(), order[:, N - n_mask :].contiguous()


def patch_positions(idx: torch.Tensor, gw: int) -> torch.Tensor:
    """Raster patch indices -> (x, y) grid cells: (B, N) int -> (B, N, 2) float32 (x = col, y = row)."""
    if isinstance(gw, bool) or int(gw) != gw or gw < 1:
        raise ValueError(f"gw must be a positive integer, got {gw!r}")
    gw = int(gw)
    x = torch.remainder(idx, gw)
    y = torch.div(idx, gw, rounding_mode="floor")
    return torch.stack([x, y], dim=-1).to(torch.float32)


def sample_queries(
    masked_idx: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random subset of the masked patches, exact size per image, ascending.

    Args:
        masked_idx: (B, Nm) int64 raster indices of the masked patches, ascending.
        ratio: fraction in (0, 1]; each image keeps round(ratio * Nm) patches (at least 1).
        generator: source of randomness (drawn on its device); the global RNG when None.
    Returns:
        (B, Nk) int64 subset of ``masked_idx``, ascending; ``masked_idx`` itself when Nk = Nm.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"pred_ratio must be in (0, 1], got {ratio!r}")
    B, Nm = masked_idx.shape
    k = min(Nm, max(1, round(ratio * Nm)))
    if k == Nm:
        return masked_idx
    draw = generator.device if generator is not None else masked_idx.device
    noise = torch.rand((B, Nm), generator=generator, device=draw).to(masked_idx.device)
    keep = noise.argsort(dim=1)[:, :k].sort(dim=1).values  # (B, Nk) positions in the masked list
    return masked_idx.gather(1, keep)
