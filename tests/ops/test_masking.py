"""Masking (paper 3.4, DESIGN 2.2): exact ratio at any grid, seeding, Perlin smoothness, indices."""

import pytest
import torch

from affmae.ops.masking import (
    make_mask,
    mask_indices,
    num_masked,
    patch_positions,
    perlin_noise,
    uniform_noise,
)

PATCH = 8
SQUARE_PX = (448, 512, 640, 768, 1000)  # grids 56, 64, 80, 96, 125 (none divisible by 64 but 512)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _equal_neighbour_fraction(m: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw) bool -> (B,) fraction of 4-neighbour pairs with the same mask value."""
    vert = (m[:, 1:, :] == m[:, :-1, :]).flatten(1)
    horiz = (m[:, :, 1:] == m[:, :, :-1]).flatten(1)
    return torch.cat([vert, horiz], dim=1).float().mean(dim=1)


@pytest.mark.parametrize("kind", ["perlin", "uniform"])
@pytest.mark.parametrize(
    "grid_hw",
    [(px // PATCH, px // PATCH) for px in SQUARE_PX] + [(56, 125), (80, 96), (1, 7), (5, 1)],
)
def test_exact_count_every_image(kind, grid_hw):
    gh, gw = grid_hw
    n = gh * gw
    for ratio in (0.0, 0.25, 0.5, 0.75, 0.9):
        if round(ratio * n) >= n:
            continue
        m = make_mask(3, grid_hw, ratio, kind=kind, generator=_gen(1))
        assert m.shape == (3, n) and m.dtype == torch.bool, f"got {m.shape} {m.dtype}"
        want = num_masked(n, ratio)
        assert want == round(ratio * n)
        counts = m.sum(dim=1).tolist()
        assert counts == [want] * 3, f"{kind} {grid_hw} r={ratio}: counts {counts}, want {want}"


def test_num_masked_rejects_bad_ratios():
    assert num_masked(10, 0.0) == 0
    assert num_masked(5, 0.5) == 2  # Python round: half to even
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            num_masked(10, bad)
    with pytest.raises(ValueError, match="visible"):
        num_masked(10, 0.96)  # round(9.6) = 10 hides every patch
    with pytest.raises(ValueError, match="num_patches"):
        num_masked(0, 0.5)


def test_unknown_kind_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="checkerboard"):
        make_mask(2, (8, 8), 0.5, kind="checkerboard")
    with pytest.raises(ValueError, match="ratio"):
        make_mask(2, (8, 8), 1.0)
    with pytest.raises(ValueError, match="grid_hw"):
        make_mask(2, (8, 0), 0.5)
    for bad in ((), (0,), (4, -2)):
        with pytest.raises(ValueError, match="scales"):
            perlin_noise(2, (8, 8), scales=bad)


@pytest.mark.parametrize("kind", ["perlin", "uniform"])
def test_seeded_determinism(kind):
    a = make_mask(4, (56, 80), 0.5, kind=kind, generator=_gen(7))
    b = make_mask(4, (56, 80), 0.5, kind=kind, generator=_gen(7))
    c = make_mask(4, (56, 80), 0.5, kind=kind, generator=_gen(8))
    assert torch.equal(a, b), "same seed gave different masks"
    diff = (a != c).float().mean().item()
    assert diff > 0.2, f"different seeds agree too much: only {diff:.3f} of patches differ"


def test_noise_shapes_and_values():
    for fn in (uniform_noise, perlin_noise):
        x = fn(3, (125, 56), generator=_gen(0))
        assert x.shape == (3, 125, 56) and x.dtype == torch.float32, f"{fn.__name__}: {x.shape} {x.dtype}"
        assert torch.isfinite(x).all(), f"{fn.__name__} not finite"
    p = perlin_noise(8, (40, 40), scales=(4,), generator=_gen(0))
    assert p.abs().max() < 1.0, f"Perlin noise with unit gradients must stay in (-1, 1), max {p.abs().max()}"
    assert p.std() > 0.1, f"Perlin noise nearly constant: std {p.std():.3f}"


def test_perlin_masks_smoother_than_uniform():
    grid = (56, 80)
    uni = make_mask(16, grid, 0.5, kind="uniform", generator=_gen(0)).view(16, *grid)
    per = make_mask(16, grid, 0.5, kind="perlin", generator=_gen(0)).view(16, *grid)
    e_uni = _equal_neighbour_fraction(uni).mean().item()
    e_per = _equal_neighbour_fraction(per).mean().item()
    assert abs(e_uni - 0.5) < 0.05, f"uniform masks at r=0.5 should be ~0.5 agreeing, got {e_uni:.3f}"
    assert e_per > e_uni + 0.15, f"Perlin {e_per:.3f} not clearly smoother than uniform {e_uni:.3f}"


def test_perlin_scales_set_blob_size_per_image():
    grid = (40, 40)
    fine = make_mask(16, grid, 0.5, scales=(2,), generator=_gen(0)).view(16, *grid)
    coarse = make_mask(16, grid, 0.5, scales=(8,), generator=_gen(0)).view(16, *grid)
    e_fine = _equal_neighbour_fraction(fine).mean().item()
    e_coarse = _equal_neighbour_fraction(coarse).mean().item()
    assert e_coarse > e_fine + 0.2, f"scale 8 ({e_coarse:.3f}) not smoother than scale 2 ({e_fine:.3f})"
    # One scale per image (not an octave sum): a (2, 16) batch splits into two clear groups.
    mixed = make_mask(64, grid, 0.5, scales=(2, 16), generator=_gen(0)).view(64, *grid)
    e = _equal_neighbour_fraction(mixed)
    n_fine = int((e < 0.7).sum())
    n_coarse = int((e > 0.85).sum())
    assert n_fine + n_coarse == 64, f"images neither clearly fine nor coarse: {sorted(e.tolist())}"
    assert n_fine >= 16 and n_coarse >= 16, f"scale choice not mixed: {n_fine} fine, {n_coarse} coarse"


def test_mask_indices_sorted_partition():
    m = make_mask(5, (9, 13), 0.6, generator=_gen(3))
    vis, hid = mask_indices(m)
    n = 9 * 13
    nm = num_masked(n, 0.6)
    assert vis.shape == (5, n - nm) and hid.shape == (5, nm), f"{vis.shape} {hid.shape}"
    assert vis.dtype == torch.int64 and hid.dtype == torch.int64
    for b in range(5):
        assert torch.all(vis[b, 1:] > vis[b, :-1]), f"visible indices of image {b} not ascending"
        assert torch.all(hid[b, 1:] > hid[b, :-1]), f"masked indices of image {b} not ascending"
        assert torch.equal(torch.sort(torch.cat([vis[b], hid[b]])).values, torch.arange(n))
        assert m[b, hid[b]].all() and not m[b, vis[b]].any(), f"image {b}: indices disagree with mask"


def test_mask_indices_rejects_uneven_and_non_bool():
    m = torch.zeros(2, 6, dtype=torch.bool)
    m[0, :3] = True
    m[1, :2] = True
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        mask_indices(m)
    with pytest.raises(ValueError, match="bool"):
        mask_indices(m.long())


def test_patch_positions_raster_order():
    gw = 13
    idx = torch.tensor([[0, 1, 12, 13, 27], [116, 5, 26, 40, 100]])
    pos = patch_positions(idx, gw)
    assert pos.shape == (2, 5, 2) and pos.dtype == torch.float32
    assert torch.equal(pos[..., 0], (idx % gw).float()), f"x wrong: {pos[..., 0]}"
    assert torch.equal(pos[..., 1], (idx // gw).float()), f"y wrong: {pos[..., 1]}"
    assert torch.equal((pos[..., 1] * gw + pos[..., 0]).long(), idx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_cuda_device_matches_cpu():
    for kind in ("perlin", "uniform"):
        a = make_mask(4, (64, 96), 0.75, kind=kind, generator=_gen(5))
        b = make_mask(4, (64, 96), 0.75, kind=kind, generator=_gen(5), device="cuda")
        assert b.device.type == "cuda"
        assert torch.equal(b.sum(1).cpu(), a.sum(1)), f"{kind}: counts differ on CUDA"
        # Same random draws; float rounding may only swap patches right at the rank threshold.
        diff = (a != b.cpu()).float().mean().item()
        assert diff < 1e-3, f"{kind}: CPU-seeded masks differ on CUDA in {diff:.4%} of patches"


def test_ratio_matches_for_large_batch_quickly():
    # 1000 px at patch 8, batch 64: the vectorised path must not loop per pixel.
    m = make_mask(64, (125, 125), 0.75, generator=_gen(0))
    want = num_masked(125 * 125, 0.75)
    assert bool((m.sum(1) == want).all()), f"counts {m.sum(1).unique().tolist()}, want {want}"


def test_mask_indices_with_known_count_skips_nothing_else():
    from affmae.ops.masking import make_mask, mask_indices, num_masked

    mask = make_mask(3, (7, 9), 0.5, generator=torch.Generator().manual_seed(0))
    n = num_masked(63, 0.5)
    got = mask_indices(mask, n)
    want = mask_indices(mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "known count changes the split"
    with pytest.raises(ValueError, match="num_masked"):
        mask_indices(mask, 64)
