"""The decoder's neighbour table: the Triton ranking kernel (``affmae::cell_table``) selects
exactly the slots the PyTorch ranking selects, ties and padding included (interpreter on CPU,
the real kernel on a GPU), and ``cell_neighbours`` uses it where it can."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import interpret

_CASES = textwrap.dedent("""
    import math
    import torch
    from affmae.ops.clustering import balanced_clustering, gather_tokens, pad_tokens
    from affmae.ops.interpolate import FAR, TILE, rank_cell_candidates
    from affmae.ops.patches import grid_positions

    def cases(device, full=False):
        g = torch.Generator().manual_seed(0)
        shapes = [(16, 64, 64, 2048, 4, 12)] if full else [
            (2, 9, 13, 60, 4, 3),    # grid not a multiple of the tile, a padded cluster
            (1, 8, 8, 64, 4, 8),     # every cell a key: distance-0 hits and many ties
            (3, 5, 7, 11, 6, 2)]     # few keys: k close to the candidate count
        for B, gh, gw, nk, k, kc in shapes:
            cells = grid_positions(torch.arange(gh * gw)[None], gw)[0].float()
            keys = torch.stack([cells[torch.randperm(gh * gw, generator=g)[:nk]]
                                for _ in range(B)])
            cl = balanced_clustering(keys, (gh, gw))
            pos = pad_tokens(gather_tokens(keys, cl.perm), cl.n_padded)
            pos[:, cl.n_valid:] = FAR
            T = math.ceil(gh / TILE) * math.ceil(gw / TILE)
            nbr = torch.randint(0, cl.n_padded // cl.m, (B, T, kc), generator=g)
            cand = (nbr[..., None] * cl.m + torch.arange(cl.m)).flatten(2)
            yield cand.to(device), pos.to(device), gh, gw, min(k, cand.shape[-1])
            # off-grid positions: the kernel must round its distances as PyTorch does
            jitter = torch.rand(pos.shape, generator=g) * 0.9
            yield cand.to(device), (pos + jitter).to(device), gh, gw, min(k, cand.shape[-1])

    def mismatches(device, full=False):
        from affmae.ops._cell_table_kernel import cell_table_triton
        bad = []
        for cand, pos, gh, gw, k in cases(device, full):
            got = cell_table_triton(cand, pos, gh, gw, TILE, k)
            want = rank_cell_candidates(cand, pos, gh, gw, k)
            if not torch.equal(got, want):
                n = (got != want).any(-1).sum().item()
                bad.append(f"{tuple(cand.shape)} grid {gh}x{gw} k={k}: {n} cells differ")
        return bad
""")


def test_interpreter_kernel_selects_what_pytorch_selects():
    out = interpret(_CASES + "\nprint(mismatches('cpu') or 'ok')\n")
    assert out == "ok", out[-3000:]


def test_cell_neighbours_uses_the_kernel_only_where_triton_runs(monkeypatch):
    from affmae.ops import interpolate

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cand = torch.zeros(1, 4, 16, dtype=torch.long)
    assert not interpolate._fused_table_ok(torch.zeros(1, 8, 2), cand, 4)  # plain CPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpolate._fused_table_ok(torch.zeros(1, 8, 2), cand, 4)
    assert not interpolate._fused_table_ok(torch.zeros(1, 8, 2), cand, 64)  # k beyond the kernel
    from affmae.ops._cell_table_kernel import cell_table_triton

    with pytest.raises(ValueError, match="k=17 must be in"):  # more than the 16 candidates
        cell_table_triton(cand, torch.zeros(1, 8, 2), 4, 4, 4, 17)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_selects_what_pytorch_selects():
    scope: dict = {}
    exec(_CASES, scope)
    assert scope["mismatches"]("cuda") == []
    assert scope["mismatches"]("cuda", full=True) == []  # 512 px, batch 16
