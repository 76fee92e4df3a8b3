"""Radial power spectrum (paper eq. 4) and log-log slope."""

import math

import numpy as np
import pytest
import torch

from affmae.analysis.spectrum import radial_psd, spectral_slope


def _power_law_field(n: int, hw: tuple[int, int], seed: int) -> torch.Tensor:
    """Random-phase fields with amplitude 1/f, i.e. power 1/f^2: (n, H, W) float64."""
    H, W = hw
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(H, dtype=torch.float64).view(H, 1)
    fx = torch.fft.fftfreq(W, dtype=torch.float64).view(1, W)
    f = torch.sqrt(fx**2 + fy**2)
    amp = torch.where(f > 0, 1.0 / f.clamp_min(1e-12), torch.zeros((), dtype=torch.float64))
    phase = torch.rand((n, H, W), generator=g, dtype=torch.float64) * (2 * math.pi)
    return torch.fft.ifft2(amp * torch.exp(1j * phase)).real


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_white_noise_is_flat_at_its_variance(hw):
    x = torch.randn((16, *hw), generator=torch.Generator().manual_seed(0)) * 2.0
    freqs, psd = radial_psd(x)
    slope = spectral_slope(freqs, psd)
    assert abs(slope) < 0.2, f"white noise {hw}: slope {slope:.3f}, want ~0"
    level = psd.mean()
    assert abs(level - 4.0) < 0.4, f"white noise of variance 4 should have PSD ~4, got {level:.3f}"


@pytest.mark.parametrize("hw", [(128, 128), (96, 128)])
def test_power_law_field_has_slope_minus_two(hw):
    freqs, psd = radial_psd(_power_law_field(8, hw, seed=1))
    slope = spectral_slope(freqs, psd)
    assert abs(slope + 2.0) < 0.2, f"1/f^2 field {hw}: slope {slope:.3f}, want -2"


def test_frequency_axis_and_sinusoid_peak():
    H, W = 48, 80
    y = torch.arange(H, dtype=torch.float64).view(H, 1).expand(H, W)
    img = torch.cos(2 * math.pi * 6 * y / H)  # 6 cycles over H: 0.125 cycles/pixel along y
    freqs, psd = radial_psd(img)  # a single (H, W) image is accepted
    assert freqs[0] == pytest.approx(1 / 80) and freqs[-1] == pytest.approx(0.5)
    assert np.all(np.diff(freqs) > 0), "frequencies not ascending"
    peak = freqs[int(np.argmax(psd))]
    assert peak == pytest.approx(0.125), f"sinusoid at 0.125 cycles/pixel peaks at {peak}"


def test_bool_masks_and_bad_inputs():
    m = torch.zeros(2, 16, 16, dtype=torch.bool)
    m[:, :8] = True
    freqs, psd = radial_psd(m)
    assert np.isfinite(psd).all() and psd.max() > 0, "bool masks should give a finite, non-zero PSD"
    with pytest.raises(ValueError, match="shape"):
        radial_psd(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        radial_psd(torch.full((1, 8, 8), float("nan")))


def test_spectral_slope_fits_exact_power_laws_and_ranges():
    f = np.linspace(0.01, 0.5, 100)
    assert spectral_slope(f, 3.0 * f**-2.5) == pytest.approx(-2.5, abs=1e-9)
    broken = np.where(f < 0.1, f**-1.0, 0.1**1.0 * (f / 0.1) ** -3.0 / 0.1**2)  # knee at 0.1
    assert spectral_slope(f, broken, fmax=0.09) == pytest.approx(-1.0, abs=1e-9)
    assert spectral_slope(f, broken, fmin=0.11) == pytest.approx(-3.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        spectral_slope(f, f**-2, fmin=0.6)
    with pytest.raises(ValueError, match="length"):
        spectral_slope(f, f[:-1])
