"""``AFFMAE_KERNELS=torch`` puts every "auto" op on its PyTorch path: under Triton's
interpreter (where "auto" otherwise runs the package's CPU-interpretable kernels: neighbour
ranking, cell tables, interpolation and merge weights) a whole AFFMAE training step then
computes bit for bit what plain CPU PyTorch computes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_STEP = """
import torch
from affmae import create_model
from affmae.ops.masking import make_mask
torch.manual_seed(0)
model = create_model("aff_tiny")
g = torch.Generator().manual_seed(1)
imgs = torch.randn(2, 1, 64, 64, generator=g)
mask = make_mask(2, (8, 8), 0.5, "perlin", generator=g)
out = model(imgs, mask)
out["loss"].backward()
vals = [out["loss"].detach().reshape(1)] + [p.grad.reshape(-1) for p in model.parameters()
                                             if p.grad is not None]
print(torch.cat(vals).double().sum().item(), torch.cat(vals).abs().double().sum().item(),
      out["loss"].item())
"""


def _step(**env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AFFMAE_KERNELS")}
    out = subprocess.run([sys.executable, "-c", _STEP], capture_output=True, text=True,
                         timeout=300, env={**full, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_torch_switch_gives_the_plain_pytorch_step_under_the_interpreter():
    plain = _step()
    assert _step(TRITON_INTERPRET="1", AFFMAE_KERNELS="torch") == plain
    # Without the switch the interpreter runs the kernels, which round differently: the
    # comparison above is not vacuous.
    assert _step(TRITON_INTERPRET="1") != plain


def test_unknown_value_is_an_error(monkeypatch):
    from affmae.ops.dispatch import package_kernels

    monkeypatch.setenv("AFFMAE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="AFFMAE_KERNELS must be 'auto' or 'torch'"):
        package_kernels()
    monkeypatch.setenv("AFFMAE_KERNELS", "TORCH")
    assert not package_kernels()
    monkeypatch.delenv("AFFMAE_KERNELS")
    assert package_kernels()


def test_explicit_triton_request_still_names_its_problem(monkeypatch):
    """The switch changes "auto" only: an explicit backend="triton" is not silently dropped."""
    from affmae.ops.interpolate import interpolation_weights

    monkeypatch.setenv("AFFMAE_KERNELS", "torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    points = torch.zeros(1, 2, 1, 1, 2)
    sel = torch.zeros(1, 2, 1, 1, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="backend='triton' requested"):
        interpolation_weights(points, sel, torch.zeros(1, 4, 2), torch.ones(1), backend="triton")
