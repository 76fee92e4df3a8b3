"""``affmae.ops.smallest_k``: the reference (stable sort) and the Triton kernel select the same
indices, ties included (interpreter on CPU, the real kernel on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from affmae.ops.smallest_k import smallest_k, smallest_k_ref


def _cases(device="cpu"):
    g = torch.Generator().manual_seed(0)
    yield torch.rand(3, 37, 96, generator=g).to(device), 4  # decoder table shape
    # integer-valued distances on a grid: many exact ties
    yield torch.randint(0, 5, (2, 50, 24), generator=g).float().to(device), 6
    yield torch.rand(1, 5, 300, generator=g).to(device), 8  # a long row (clusters)
    yield torch.full((2, 3, 7), 1e12).to(device), 7  # all padding, k = N


def test_reference_is_topk_with_ties_to_the_lower_index():
    for d, k in _cases():
        idx = smallest_k_ref(d, k)
        vals = torch.gather(d, -1, idx)
        torch.testing.assert_close(vals, torch.topk(d, k, dim=-1, largest=False).values)
        # among equal values the lower index comes first
        same = vals[..., 1:] == vals[..., :-1]
        assert bool((idx[..., 1:][same] > idx[..., :-1][same]).all())
    assert smallest_k(torch.rand(2, 3), 5).shape == (2, 3)  # k clipped to N
    long = torch.rand(2, 1500)  # beyond the kernel's row length: topk, same values
    torch.testing.assert_close(torch.gather(long, -1, smallest_k(long, 8)),
                               torch.topk(long, 8, largest=False).values)


def test_interpreter_kernel_selects_what_the_reference_selects():
    code = """
import torch
from affmae.ops._smallest_k_kernel import smallest_k_triton
from affmae.ops.smallest_k import smallest_k_ref
import affmae.ops._smallest_k_kernel as kernel
kernel._MIN_PROGRAMS = 8  # several rows per program at interpreter-sized inputs
g = torch.Generator().manual_seed(0)
for d, k in [(torch.rand(3, 37, 96, generator=g), 4),
             (torch.randint(0, 5, (2, 50, 24), generator=g).float(), 6),
             (torch.full((2, 3, 7), 1e12), 7),
             (torch.rand(43, 20, generator=g), 5)]:  # 4 rows per program (below), a partial last one
    assert torch.equal(smallest_k_triton(d, k), smallest_k_ref(d, k)), (d.shape, k)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_selects_what_the_reference_selects():
    for d, k in _cases("cuda"):
        assert torch.equal(smallest_k(d, k), smallest_k_ref(d, k)), (d.shape, k)
    d = torch.randint(0, 50, (16, 4096, 96), device="cuda").float()  # full size, ties
    assert torch.equal(smallest_k(d, 4), smallest_k_ref(d, 4))
