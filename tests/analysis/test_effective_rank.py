"""Normalised effective rank (paper eq. 3)."""

import numpy as np
import pytest
import torch

from affmae.analysis.rank import effective_rank


def test_orthogonal_sets_have_rank_one():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    cases = {
        "identity": torch.eye(16),
        "orthogonal 32x32": q,
        "orthonormal rows 8x32": q[:8],
        "orthonormal columns 32x8": q[:, :8] * 3.0,  # scale does not matter
    }
    for name, x in cases.items():
        r = effective_rank(x)
        assert abs(r - 1.0) < 1e-6, f"{name}: effective rank {r}, want 1"


def test_rank_one_data_gives_one_over_min_dim():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(200, 1, generator=g)
    v = torch.randn(1, 32, generator=g)
    r = effective_rank(u @ v)
    assert abs(r - 1 / 32) < 1e-4, f"rank-one data: {r}, want {1 / 32}"
    noisy = u @ v + 1e-4 * torch.randn(200, 32, generator=g)
    r_noisy = effective_rank(noisy)
    assert abs(r_noisy - 1 / 32) < 0.01, f"rank-one + tiny noise: {r_noisy}, want ~{1 / 32}"
    wide = v.T @ u.T  # (32, 200): min(N, D) is now N
    assert abs(effective_rank(wide) - 1 / 32) < 1e-4


def test_numpy_and_torch_agree_and_gaussian_is_high():
    x = np.random.default_rng(0).standard_normal((500, 24))
    r_np = effective_rank(x)
    r_t = effective_rank(torch.from_numpy(x).float())
    assert abs(r_np - r_t) < 1e-5, f"numpy {r_np} vs torch {r_t}"
    assert 0.9 < r_np <= 1.0, f"isotropic Gaussian tokens should be near 1, got {r_np}"


def test_center_flag_removes_shared_offset():
    g = torch.Generator().manual_seed(2)
    x = 10.0 + torch.randn(300, 16, generator=g)  # one dominant mean direction
    raw = effective_rank(x)
    centred = effective_rank(x, center=True)
    assert raw < 0.5, f"uncentred features with a large offset should look low-rank, got {raw}"
    assert centred > 0.9, f"centred isotropic features should be near 1, got {centred}"


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="singular"):
        effective_rank(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="after centring"):
        effective_rank(torch.ones(5, 4), center=True)
    with pytest.raises(ValueError, match="NaN"):
        effective_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
