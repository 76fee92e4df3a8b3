"""Balanced space-filling-curve clustering and neighbourhoods: index-only ops, checked exactly."""

import pytest
import torch

from affmae.ops import clustering as C


def grid(gh, gw):
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(1, -1, 2).float()


@pytest.mark.parametrize("gh,gw", [(16, 16), (13, 21), (56, 56), (96, 128), (7, 1), (125, 80)])
def test_curve_is_a_bijection_with_neighbour_steps(gh, gw):
    rank = C.curve_rank((gh, gw))
    assert torch.equal(rank.sort().values, torch.arange(gh * gw)), "ranks are not a permutation"
    walk = grid(gh, gw)[0][rank.argsort()]
    steps = (walk[1:] - walk[:-1]).abs()
    assert steps.max() <= 1, f"curve jumps by {steps.max().item()} cells"
    diagonal = int((steps.sum(-1) == 2).sum())
    assert diagonal <= 1, f"{diagonal} diagonal steps (at most one for odd x odd grids)"


@pytest.mark.parametrize("gh,gw,keep", [(16, 16, 256), (13, 21, 150), (56, 56, 1568), (7, 9, 5)])
def test_clustering_is_a_compact_permutation(gh, gw, keep):
    g = torch.Generator().manual_seed(gh * gw)
    B = 3
    pos = torch.stack([grid(gh, gw)[0][torch.randperm(gh * gw, generator=g)[:keep]]
                       for _ in range(B)])
    cl = C.balanced_clustering(pos, (gh, gw), m=8, num_nbr_clusters=8)
    N = pos.shape[1]
    assert torch.equal(cl.perm.sort(dim=1).values, torch.arange(N).expand(B, -1)), \
        "perm is not a permutation of the tokens"
    pc = C.gather_tokens(pos, cl.perm)
    M = -(-N // 8)
    assert cl.centroids.shape == (B, M, 2)
    # Compactness: every real token lies within a small radius of its cluster centroid,
    # relative to the typical spacing of the token set.
    spacing = (gh * gw / N) ** 0.5
    cluster = torch.arange(N) // 8
    dist = (pc - cl.centroids[:, cluster]).norm(dim=-1)  # (B, N)
    radius, mean = dist.max().item(), dist.mean().item()
    assert radius <= 5.0 * spacing + 1.0, f"max cluster radius {radius:.2f} (spacing {spacing:.2f})"
    assert mean <= 1.5 * spacing, f"mean distance to centroid {mean:.2f} (spacing {spacing:.2f})"


def test_full_grid_clusters_are_tight():
    pos = grid(32, 32)
    cl = C.balanced_clustering(pos, (32, 32), m=8)
    pc = C.gather_tokens(pos, cl.perm).view(1, -1, 8, 2)
    radius = (pc - pc.mean(2, keepdim=True)).norm(dim=-1).max().item()
    assert radius <= 1.6, f"8-cell Hilbert clusters of a full grid have radius {radius:.2f}"


def test_neighbourhoods_contain_own_cluster_first_and_are_nearest():
    g = torch.Generator().manual_seed(0)
    pos = grid(20, 20)[0][torch.randperm(400, generator=g)[:217]][None]
    cl = C.balanced_clustering(pos, (20, 20), m=8, num_nbr_clusters=8)
    M = cl.num_clusters
    assert torch.equal(cl.nbr[0, :, 0], torch.arange(M)), "own cluster is not first"
    d = torch.cdist(cl.centroids[0], cl.centroids[0])
    for c in range(M):
        got = d[c, cl.nbr[0, c, 1:]].max()
        others = torch.ones(M, dtype=torch.bool)
        others[cl.nbr[0, c]] = False
        if others.any():
            assert got <= d[c, others].min() + 1e-5, f"cluster {c}: a nearer cluster was left out"


def test_global_when_few_clusters():
    pos = grid(4, 5)
    cl = C.balanced_clustering(pos, (4, 5), m=8, num_nbr_clusters=8)
    assert cl.nbr.shape == (1, 3, 3), f"expected every cluster as neighbour, got {cl.nbr.shape}"


def test_nearest_clusters_chunking_is_exact(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k = torch.rand(2, 50, 2, generator=g) * 30, torch.rand(2, 40, 2, generator=g) * 30
    full = C.nearest_clusters(q, k, 6)
    monkeypatch.setattr(C, "_CHUNK_ELEMENTS", 2 * 40 * 7)
    assert torch.equal(C.nearest_clusters(q, k, 6), full), "chunked search differs"


def test_gather_tokens_with_inverse_same_values_and_gradients():
    """With the index's inverse, gather_tokens' backward is a gather (no atomics): same output
    and gradient as the plain index_select, including zero gradient on unpicked padding rows."""
    g = torch.Generator().manual_seed(0)
    B, N, n = 3, 11, 8  # x has 11 rows, the first 8 are picked (the rest: padding)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(B)])
    inv = C.inverse_permutation(perm)
    assert torch.equal(inv, torch.argsort(perm, dim=1))
    for rows, idx, inverse in ((N, inv, perm), (n, perm, inv)):  # padded x; a full permutation
        x = torch.randn(B, rows, 4, 2, generator=g)
        gy = torch.randn(B, n, 4, 2, generator=g)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = C.gather_tokens(xa, idx, inverse), C.gather_tokens(xb, idx)
        assert torch.equal(ya, yb)
        ya.backward(gy)
        yb.backward(gy)
        assert torch.equal(xa.grad, xb.grad)
    with pytest.raises(ValueError, match="does not invert"):
        C.gather_tokens(torch.randn(B, N, 2, requires_grad=True), perm, inv[:, :5])


# The clustering's index glue in its earlier, longer form (session 7): the current one must
# give bitwise the same clusterings, neighbourhoods and neighbour tables.
def _old_curve_index(pos, grid_hw):
    x = pos[..., 0].round().long()
    y = pos[..., 1].round().long()
    return C.curve_rank(grid_hw, pos.device)[y * int(grid_hw[1]) + x]


def _old_centroids(pos, n_valid, m):
    B, Np, _ = pos.shape
    valid = (torch.arange(Np) < n_valid).to(pos.dtype)
    w = valid.view(1, Np // m, m, 1)
    return (pos.float().view(B, Np // m, m, 2) * w).sum(2) / w.sum(2).clamp_min(1.0)


def _old_nearest(query, keys, k, self_first=False):
    B, Mq, _ = query.shape
    Mk = keys.shape[1]
    d = (query.float()[:, :, None, :] - keys.float()[:, None, :, :]).square().sum(-1)
    if self_first:
        d = d.masked_fill(torch.arange(Mq)[:, None] == torch.arange(Mk), -1.0)
    return C.smallest_k(d, min(k, Mk))


@pytest.mark.parametrize("gh,gw,keep,m", [(16, 16, 1.0, 8), (13, 21, 0.5, 8), (32, 32, 0.37, 8),
                                          (20, 9, 0.61, 6), (7, 1, 0.8, 4)])
def test_index_glue_is_bitwise_the_longer_form(gh, gw, keep, m, monkeypatch):
    from affmae.ops import interpolate as I

    g = torch.Generator().manual_seed(gh * gw)
    B = 3
    n = max(1, int(gh * gw * keep))
    pos = torch.stack([grid(gh, gw)[0, torch.randperm(gh * gw, generator=g)[:n]]
                       for _ in range(B)])
    assert torch.equal(C.curve_index(pos, (gh, gw)), _old_curve_index(pos, (gh, gw)))
    cl = C.balanced_clustering(pos, (gh, gw), m, 5)
    pos_c = C.pad_tokens(C.gather_tokens(pos, cl.perm), cl.n_padded)
    assert torch.equal(cl.centroids, _old_centroids(pos_c, n, m))  # padding in the last cluster
    assert torch.equal(cl.nbr, _old_nearest(cl.centroids, cl.centroids, 5, self_first=True))
    monkeypatch.setattr(C, "_CHUNK_ELEMENTS", B * cl.num_clusters * 3)  # diagonal per chunk
    assert torch.equal(C.nearest_clusters(cl.centroids, cl.centroids, 5, self_first=True), cl.nbr)
    monkeypatch.undo()
    # the decoder's neighbour table: cached tile centres, broadcast over the batch
    th, tw = -(-gh // I.TILE), -(-gw // I.TILE)
    ty, tx = torch.meshgrid(torch.arange(th), torch.arange(tw), indexing="ij")
    half = (I.TILE - 1) / 2
    centre = torch.stack([(tx * I.TILE + half).clamp(max=gw - 1),
                          (ty * I.TILE + half).clamp(max=gh - 1)], -1).float().view(1, -1, 2)
    assert torch.equal(I._tile_centres(gh, gw, "cpu"), centre)
    assert torch.equal(C.nearest_clusters(centre, cl.centroids, 4),
                       _old_nearest(centre.expand(B, -1, -1), cl.centroids, 4))
