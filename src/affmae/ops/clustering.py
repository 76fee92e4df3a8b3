"""Balanced space-filling-curve clustering and cluster neighbourhoods (AFF sec. 3.1; DESIGN 2.4a-b).

1. Every token sits on an integer cell of the stage-1 patch grid (kept tokens keep their cells).
   Tokens are ordered along a Hilbert curve over that grid, which keeps consecutive tokens close.
2. The ordered sequence is cut into clusters of ``m`` tokens; the last cluster is padded.
   Every image of a batch has the same token count, so padding sits at the end, at the same slots.
3. A cluster's neighbourhood is the ``Kc`` clusters whose centroids are nearest to its centroid
   (itself first). The ``m`` queries of a cluster share it, so attention is a dense
   (m x Kc*m) product per cluster.

Deviation from the AFF code: no anchor-cell quantisation step; the Hilbert curve runs over the
exact grid cells, which is the finest anchor grid and needs no per-size cache.
Neighbour search compares cluster centroids (M x M per image, chunked), i.e. N^2 / m^2, not
tokens: at 1024 px and N = 8192 that is 1M distances per image, far below the attention cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHUNK_ELEMENTS = 1 << 25  # cap on a (B, chunk, Mk) distance block


def hilbert_index(xy: torch.Tensor, order: int) -> torch.Tensor:
    """Hilbert-curve index of integer cells.

    Args:
        xy: (..., 2) integer-valued (x, y) cells in [0, 2**order).
        order: curve order; the curve covers a 2**order square grid.
    Returns:
        (...,) int64 distance along the curve (unique per cell).
    """
    x = xy[..., 0].round().long()
    y = xy[..., 1].round().long()
    n = 1 << order
    d = torch.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d = d + s * s * ((3 * rx.long()) ^ ry.long())
        # Rotate the quadrant so the sub-curve has the canonical orientation.
        flip = (~ry) & rx
        x = torch.where(flip, n - 1 - x, x)
        y = torch.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s >>= 1
    return d


def curve_order(grid_hw: tuple[int, int]) -> int:
    """Smallest Hilbert order whose square covers a (gh, gw) grid."""
    side = max(int(grid_hw[0]), int(grid_hw[1]), 1)
    return max(1, (side - 1).bit_length())


@dataclass
class Clustering:
    """Balanced clusters of one token set. Tokens are stored in ``perm`` order, padded to M * m.

    Attributes:
        perm: (B, N) int64, input index of the token at each clustered slot (real tokens only).
        n_valid: N, the real token count (same for every image); slots >= N are padding.
        m: tokens per cluster.
        centroids: (B, M, 2) float32 mean position of each cluster's real tokens.
        nbr: (B, M, Kc) int64 neighbour clusters of each cluster, its own cluster first.
    """

    perm: torch.Tensor
    n_valid: int
    m: int
    centroids: torch.Tensor
    nbr: torch.Tensor

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    @property
    def n_padded(self) -> int:
        return self.num_clusters * self.m


def cluster_centroids(pos: torch.Tensor, n_valid: int, m: int) -> torch.Tensor:
    """(B, M*m, 2) clustered positions -> (B, M, 2) centroids of the real tokens."""
    B, Np, _ = pos.shape
    valid = (torch.arange(Np, device=pos.device) < n_valid).to(pos.dtype)  # (Np,)
    w = valid.view(1, Np // m, m, 1)
    s = (pos.float().view(B, Np // m, m, 2) * w).sum(2)  # (B, M, 2)
    return s / w.sum(2).clamp_min(1.0)


def nearest_clusters(
    query: torch.Tensor, keys: torch.Tensor, k: int, self_first: bool = False
) -> torch.Tensor:
    """Indices of the ``k`` key centroids nearest to each query centroid.

    Args:
        query: (B, Mq, 2) centroids. keys: (B, Mk, 2) centroids.
        k: neighbours to return (clipped to Mk).
        self_first: query i is key i (same set); it is placed first whatever the distances.
    Returns:
        (B, Mq, min(k, Mk)) int64, nearest first.
    """
    B, Mq, _ = query.shape
    Mk = keys.shape[1]
    k = min(k, Mk)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Mk))
    out = []
    for start in range(0, Mq, chunk):
        q = query[:, start : start + chunk].float()
        d = torch.cdist(q, keys.float())  # (B, chunk, Mk)
        if self_first:
            rows = torch.arange(q.shape[1], device=q.device)
            d[:, rows, rows + start] = -1.0
        out.append(torch.topk(d, k, dim=-1, largest=False, sorted=True).indices)
    return torch.cat(out, dim=1)


def balanced_clustering(
    pos: torch.Tensor, grid_hw: tuple[int, int], m: int = 8, num_nbr_clusters: int = 8
) -> Clustering:
    """Cluster a token set along a Hilbert curve and find each cluster's neighbourhood.

    Args:
        pos: (B, N, 2) token positions (integer cells of the stage-1 grid).
        grid_hw: (gh, gw) stage-1 grid size, for the curve order.
        m: tokens per cluster.
        num_nbr_clusters: Kc, clusters in each neighbourhood (clipped to M; M <= Kc is global).
    """
    B, N, _ = pos.shape
    if N == 0:
        raise ValueError("cannot cluster an empty token set (N = 0)")
    code = hilbert_index(pos, curve_order(grid_hw))  # (B, N)
    perm = torch.argsort(code, dim=1)  # (B, N)
    M = -(-N // m)
    pos_c = gather_tokens(pos, perm)
    pos_c = pad_tokens(pos_c, M * m)  # (B, M*m, 2)
    centroids = cluster_centroids(pos_c, N, m)  # (B, M, 2)
    nbr = nearest_clusters(centroids, centroids, num_nbr_clusters, self_first=True)
    return Clustering(perm=perm, n_valid=N, m=m, centroids=centroids, nbr=nbr)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, N, ...) , idx: (B, N') -> (B, N', ...) rows of x."""
    shape = idx.shape + x.shape[2:]
    flat = idx.reshape(idx.shape[0], -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, flat).reshape(shape)


def pad_tokens(x: torch.Tensor, n_total: int) -> torch.Tensor:
    """Pad (B, N, ...) to (B, n_total, ...) by repeating the last token (finite, later masked)."""
    N = x.shape[1]
    if n_total == N:
        return x
    last = x[:, N - 1 : N].expand(-1, n_total - N, *x.shape[2:])
    return torch.cat([x, last], dim=1)
