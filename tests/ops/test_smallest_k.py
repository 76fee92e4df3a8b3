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


_NEAREST = """
import torch
import affmae.ops.clustering as C
from affmae.ops.clustering import nearest_clusters
import affmae.ops._smallest_k_kernel as kernel
kernel._MIN_PROGRAMS = 8  # several rows per program at interpreter-sized inputs
calls = []
fused = kernel.nearest_k_triton
kernel.nearest_k_triton = lambda *a: calls.append(1) or fused(*a)
g = torch.Generator().manual_seed(0)
cases = [
    (torch.rand(3, 37, 2, generator=g) * 20, torch.rand(3, 37, 2, generator=g) * 20, 8, True),
    # integer centroids on a grid: many exact distance ties
    (torch.randint(0, 6, (2, 50, 2), generator=g).float(), None, 6, True),
    # one query set (tile centres) for every image, keys not a power of two, FAR padding
    (torch.rand(1, 16, 2, generator=g) * 9, torch.rand(4, 19, 2, generator=g) * 9, 5, False),
    (torch.rand(2, 5, 2, generator=g), torch.rand(2, 3, 2, generator=g), 8, False),  # k > Mk
]
cases[2][1][:, -2:] = 1e4
bad = []
for q, keys, k, self_first in cases:
    keys = q if keys is None else keys
    got = nearest_clusters(q, keys, k, self_first=self_first)  # the fused kernel (interpreter)
    C._nearest_kernel_ok = lambda *a: False
    want = nearest_clusters(q, keys, k, self_first=self_first)  # distances, then smallest_k
    C._nearest_kernel_ok = ok
    if not torch.equal(got, want):
        bad.append((tuple(q.shape), tuple(keys.shape), k, self_first))
print(bad or ("ok" if len(calls) == len(cases) else f"the fused kernel ran {len(calls)} times"))
"""


def test_interpreter_fused_nearest_search_selects_what_the_two_step_search_selects():
    """``nearest_clusters`` through the fused kernel (distances in registers) returns the same
    indices as the PyTorch distances + ``smallest_k`` path: ties, self-first, a broadcast
    query set, padding far away, k above the key count."""
    code = _NEAREST.replace("bad = []", "ok = C._nearest_kernel_ok\nbad = []")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.stdout, out.stderr[-2000:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_nearest_search_selects_what_the_two_step_search_selects():
    import affmae.ops.clustering as C
    from affmae.ops.clustering import nearest_clusters

    g = torch.Generator().manual_seed(0)
    for B, Mq, Mk, k, self_first in [(16, 256, 256, 8, True), (16, 1024, 1024, 8, True),
                                     (16, 256, 517, 8, False)]:
        q = (torch.randint(0, 64, (B, Mq, 2), generator=g).float() / 2).cuda()
        keys = q if self_first else (torch.rand(B, Mk, 2, generator=g) * 64).cuda()
        got = nearest_clusters(q, keys, k, self_first=self_first)
        ok = C._nearest_kernel_ok
        try:
            C._nearest_kernel_ok = lambda *a: False
            want = nearest_clusters(q, keys, k, self_first=self_first)
        finally:
            C._nearest_kernel_ok = ok
        assert torch.equal(got, want), (B, Mq, Mk, k, self_first)
