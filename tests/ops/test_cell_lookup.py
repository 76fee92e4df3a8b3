"""The decoder's neighbour lookup: the Triton kernel (``affmae::cell_lookup``) returns exactly
the table rows the PyTorch path returns (rounding half to even, points off the grid, both slot
dtypes; interpreter on CPU, the real kernel on a GPU), and ``lookup_neighbours`` uses it only
where Triton runs."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import interpret

_CASES = textwrap.dedent("""
    import torch
    from affmae.ops import interpolate

    def cases(device, full=False):
        g = torch.Generator().manual_seed(0)
        shapes = [(16, 2048, 24, 64, 64, 4)] if full else [
            (2, 37, 5, 9, 13, 4), (1, 20, 3, 8, 8, 16), (3, 11, 1, 5, 7, 3)]
        for B, Nq, S, gh, gw, K in shapes:
            for dtype in (torch.int32, torch.int64):
                table = torch.randint(0, 1000, (B, gh * gw, K), generator=g).to(dtype)
                # points around and beyond the grid, many exactly on a half (ties to even)
                pts = torch.rand(B, Nq, S, 2, generator=g) * torch.tensor([gw + 4.0, gh + 4.0]) - 2
                halves = (torch.randint(-4, 2 * max(gh, gw) + 4, (B, Nq, S, 2), generator=g)
                          .float() / 2)
                pts = torch.where(torch.rand(B, Nq, S, 1, generator=g) < 0.5, pts, halves)
                yield pts.to(device), table.to(device), (gh, gw)

    def mismatches(device, full=False):
        bad = []
        for pts, table, grid in cases(device, full):
            assert interpolate._lookup_kernel_ok(pts, table)
            got = interpolate.lookup_neighbours(pts, table, grid)
            want = interpolate.lookup_neighbours_reference(pts, table, grid)
            if got.dtype != want.dtype or not torch.equal(got, want):
                bad.append(f"{tuple(pts.shape)} {table.dtype}: "
                           f"{(got != want).any(-1).sum().item()} points differ")
        return bad
""")


def test_interpreter_kernel_looks_up_what_pytorch_looks_up():
    out = interpret(_CASES + "\nprint(mismatches('cpu') or 'ok')\n")
    assert out == "ok", out[-3000:]


def test_interpreter_kernel_keeps_non_finite_points_in_the_table():
    """A NaN point (a diverged step) takes cell 0 and infinities clamp, so the kernel never
    reads outside the table (the PyTorch path's long() of NaN is undefined)."""
    out = interpret(textwrap.dedent("""
        import torch
        from affmae.ops._cell_lookup_kernel import cell_lookup_triton
        nan, inf = float("nan"), float("inf")
        pts = torch.tensor([[[nan, 2.0], [1.0, inf], [-inf, 0.4], [nan, nan]]])
        table = torch.arange(24, dtype=torch.int32).view(1, 12, 2)  # 3 x 4 grid, K = 2
        print(cell_lookup_triton(pts, table, 3, 4).tolist())
    """))
    assert out == "[[[16, 17], [18, 19], [0, 1], [0, 1]]]", out


def test_lookup_uses_the_kernel_only_where_triton_runs(monkeypatch):
    from affmae.ops import interpolate

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pts, table = torch.zeros(1, 8, 2), torch.zeros(1, 16, 4, dtype=torch.int32)
    assert not interpolate._lookup_kernel_ok(pts, table)  # plain CPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpolate._lookup_kernel_ok(pts, table)
    assert not interpolate._lookup_kernel_ok(pts.double(), table)  # float32 points only
    assert not interpolate._lookup_kernel_ok(pts, table.float())  # integer slots only
    monkeypatch.setenv("AFFMAE_KERNELS", "torch")
    assert not interpolate._lookup_kernel_ok(pts, table)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_looks_up_what_pytorch_looks_up():
    scope: dict = {}
    exec(_CASES, scope)
    assert scope["mismatches"]("cuda") == []
    assert scope["mismatches"]("cuda", full=True) == []  # the decoder's size at 512 px
