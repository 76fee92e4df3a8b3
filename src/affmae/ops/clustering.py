"""Balanced space-filling-curve clustering and cluster neighbourhoods (AFF sec. 3.1; DESIGN 2.4a-b).

1. Every token sits on an integer cell of the stage-1 patch grid (kept tokens keep their cells).
   Tokens are ordered along a generalised Hilbert curve over that grid (any gh x gw), which
   keeps consecutive tokens close.
2. The ordered sequence is cut into clusters of ``m`` tokens; the last cluster is padded.
   Every image of a batch has the same token count, so padding sits at the end, at the same slots.
3. A cluster's neighbourhood is the ``Kc`` clusters whose centroids are nearest to its centroid
   (itself first). The ``m`` queries of a cluster share it, so attention is a dense
   (m x Kc*m) product per cluster.

Deviation from the AFF code: no anchor-cell quantisation step; the curve runs over the exact
grid cells, which is the finest anchor grid.
Neighbour search compares cluster centroids (M x M per image, chunked), i.e. N^2 / m^2, not
tokens: at 1024 px and N = 8192 that is 1M distances per image, far below the attention cost.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from affmae.ops.smallest_k import kernel_ok, smallest_k

_CHUNK_ELEMENTS = 1 << 24  # cap on a (B, chunk, Mk) distance block (its (.., 2) difference is twice that)


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _gilbert(x: int, y: int, ax: int, ay: int, bx: int, by: int, out: list[tuple[int, int]]) -> None:
    """Generalised Hilbert curve over the rectangle spanned by (ax, ay) x (bx, by) from (x, y)."""
    w, h = abs(ax + ay), abs(bx + by)
    dax, day, dbx, dby = _sign(ax), _sign(ay), _sign(bx), _sign(by)
    if h == 1:
        out.extend((x + i * dax, y + i * day) for i in range(w))
        return
    if w == 1:
        out.extend((x + i * dbx, y + i * dby) for i in range(h))
        return
    ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
    w2, h2 = abs(ax2 + ay2), abs(bx2 + by2)
    if 2 * w > 3 * h:
        if w2 % 2 and w > 2:  # prefer even steps
            ax2, ay2 = ax2 + dax, ay2 + day
        _gilbert(x, y, ax2, ay2, bx, by, out)
        _gilbert(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by, out)
    else:
        if h2 % 2 and h > 2:
            bx2, by2 = bx2 + dbx, by2 + dby
        _gilbert(x, y, bx2, by2, ax2, ay2, out)
        _gilbert(x + bx2, y + by2, ax, ay, bx - bx2, by - by2, out)
        _gilbert(x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby),
                 -bx2, -by2, -(ax - ax2), -(ay - ay2), out)


@functools.lru_cache(maxsize=16)
def _curve_rank_cpu(gh: int, gw: int) -> torch.Tensor:
    cells: list[tuple[int, int]] = []
    if gw >= gh:
        _gilbert(0, 0, gw, 0, 0, gh, cells)
    else:
        _gilbert(0, 0, 0, gh, gw, 0, cells)
    xy = torch.tensor(cells, dtype=torch.int64)  # (gh*gw, 2) in curve order
    rank = torch.empty(gh * gw, dtype=torch.int64)
    rank[xy[:, 1] * gw + xy[:, 0]] = torch.arange(gh * gw)
    return rank


def curve_rank(grid_hw: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(gh*gw,) int64: position of each raster cell along a generalised Hilbert curve.

    The curve (Cervenyi's "gilbert") fills any gh x gw rectangle with unit steps, so
    consecutive cells are neighbours for every image size, not only powers of two; a plain
    Hilbert curve over the enclosing square leaves and re-enters the image and cuts clusters
    in two. The table is a pure function of the grid size (cached per size, never stale).
    """
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if gh < 1 or gw < 1:
        raise ValueError(f"grid size must be positive, got {grid_hw}")
    return _curve_rank_on(gh, gw, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _curve_rank_on(gh: int, gw: int, device: str) -> torch.Tensor:
    # One host-to-device copy per (size, device), not one per stage and step.
    return _curve_rank_cpu(gh, gw).to(device)


def curve_index(pos: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(..., 2) integer (x, y) cells -> (...,) int64 index along the space-filling curve."""
    xy = pos.round().long()  # (..., 2)
    cell = torch.add(xy[..., 0], xy[..., 1], alpha=int(grid_hw[1]))  # x + y * gw, one kernel
    return curve_rank(grid_hw, pos.device)[cell]


@dataclass
class Clustering:
    """Balanced clusters of one token set. Tokens are stored in ``perm`` order, padded to M * m.

    Attributes:
        perm: (B, N) int64, input index of the token at each clustered slot (real tokens only).
        n_valid: N, the real token count (same for every image); slots >= N are padding.
        m: tokens per cluster.
        centroids: (B, M, 2) float32 mean position of each cluster's real tokens.
        nbr: (B, M, Kc) int64 neighbour clusters of each cluster, its own cluster first.
        groups: the Triton attention kernels' group structures of ``nbr`` (see
            ``attention_groups``), built on first request and shared by every attention block
            of the stage.
    """

    perm: torch.Tensor
    n_valid: int
    m: int
    centroids: torch.Tensor
    nbr: torch.Tensor
    groups: dict = field(default_factory=dict, repr=False)
    inv: torch.Tensor | None = field(default=None, repr=False)

    def attention_groups(self, backward: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Triton cluster-attention kernels' group structures of ``nbr``
        (``affmae.ops.cluster_attention.kernel.attention_groups``): the forward one, and with
        ``backward`` the key-major one as well (else None). Built once each and cached: all
        attention blocks of a stage share this clustering."""
        from affmae.ops.cluster_attention.kernel import attention_groups

        for t in (False, True) if backward else (False,):
            if t not in self.groups:
                self.groups[t] = attention_groups(self.nbr, self.m, transpose=t)
        return self.groups[False], self.groups.get(True) if backward else None

    def inverse(self) -> torch.Tensor:
        """(B, N) clustered slot of each input token (``perm``'s inverse), built once."""
        if self.inv is None:
            self.inv = inverse_permutation(self.perm)
        return self.inv

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    @property
    def n_padded(self) -> int:
        return self.num_clusters * self.m


def cluster_centroids(pos: torch.Tensor, n_valid: int, m: int) -> torch.Tensor:
    """(B, M*m, 2) clustered positions -> (B, M, 2) centroids of the real tokens.

    Slots >= n_valid are padding, all in the last cluster (``n_valid > (M - 1) * m``): their
    sum is taken back out of that cluster's before the division. Exact for integer positions
    (the token cells), so the result is bitwise that of a masked mean; two to four kernels.
    """
    B, Np, _ = pos.shape
    M = Np // m
    n_pad = Np - n_valid
    if not 0 <= n_pad < m:
        raise ValueError(f"{n_valid} real tokens do not fill all but the last of {M} clusters "
                         f"of {m}")
    pos = pos.float()
    s = pos.view(B, M, m, 2).sum(2)  # (B, M, 2)
    if n_pad == 0:
        return s.div_(m)
    s[:, -1].sub_(pos[:, n_valid:].sum(1))  # the padding's share of the last cluster
    s[:, :-1].div_(m)
    s[:, -1].div_(m - n_pad)
    return s


def nearest_clusters(
    query: torch.Tensor, keys: torch.Tensor, k: int, self_first: bool = False
) -> torch.Tensor:
    """Indices of the ``k`` key centroids nearest to each query centroid.

    On CUDA (and in Triton's interpreter), within ``smallest_k``'s limits, one fused kernel
    (``affmae::nearest_k``) computes the squared distances in registers and selects; elsewhere
    the distances are written out in chunks and ``smallest_k`` selects. Same indices.

    Args:
        query: (B, Mq, 2) centroids, or (1, Mq, 2) for the same points in every image.
        keys: (B, Mk, 2) centroids.
        k: neighbours to return (clipped to Mk).
        self_first: query i is key i (same set); it is placed first whatever the distances.
    Returns:
        (B, Mq, min(k, Mk)) int64, nearest first.
    """
    Mq = query.shape[1]
    B, Mk = max(query.shape[0], keys.shape[0]), keys.shape[1]  # a query batch of 1 broadcasts
    k = min(k, Mk)
    if _nearest_kernel_ok(query, keys, k):  # one kernel, distances in registers, same indices
        from affmae.ops._smallest_k_kernel import nearest_k_triton

        return nearest_k_triton(query.float(), keys.float(), k, self_first)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Mk))
    out = []
    for start in range(0, Mq, chunk):
        q = query[:, start : start + chunk].float()
        # Squared distances, written out: same order as the distances, and for 2-D points far
        # cheaper than torch.cdist (5 ms of a 60 ms aff_small step at 512 px on an H200).
        d = (q[:, :, None, :] - keys.float()[:, None, :, :]).square().sum(-1)  # (B, chunk, Mk)
        if self_first:  # query row i is key start + i: a fill of that diagonal (graph-safe)
            d.diagonal(offset=start, dim1=1, dim2=2).fill_(-1.0)
        out.append(smallest_k(d, k))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _nearest_kernel_ok(query: torch.Tensor, keys: torch.Tensor, k: int) -> bool:
    """Whether ``nearest_clusters`` may use the fused Triton search (``smallest_k``'s kernel
    limits, and one query set per image or one for all)."""
    return (k >= 1 and query.shape[0] in (1, keys.shape[0])
            and kernel_ok(keys, keys.shape[1], k))


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
    code = curve_index(pos, grid_hw)  # (B, N)
    perm = torch.argsort(code, dim=1)  # (B, N)
    M = -(-N // m)
    pos_c = gather_tokens(pos, perm)
    pos_c = pad_tokens(pos_c, M * m)  # (B, M*m, 2)
    centroids = cluster_centroids(pos_c, N, m)  # (B, M, 2)
    nbr = nearest_clusters(centroids, centroids, num_nbr_clusters, self_first=True)
    return Clustering(perm=perm, n_valid=N, m=m, centroids=centroids, nbr=nbr)


def inverse_permutation(idx: torch.Tensor) -> torch.Tensor:
    """(B, N) permutations -> their inverses: out[b, idx[b, j]] = j."""
    ar = torch.arange(idx.shape[1], device=idx.device, dtype=idx.dtype).expand_as(idx)
    return torch.empty_like(idx).scatter_(1, idx, ar)


def _flat_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N') indices into rows of (B, n, ...) -> (B * N',) rows of the flattened (B * n, ...).
    Two kernels (a stepped arange and the add; 28 calls per aff_small forward)."""
    B, step = idx.shape[0], max(n, 1)  # n = 0: no rows, so idx is empty (any offsets do)
    offsets = torch.arange(0, B * step, step, device=idx.device, dtype=idx.dtype)
    return (idx + offsets.view(B, 1)).reshape(-1)


class _PermutedRows(torch.autograd.Function):
    """``index_select`` of rows by a one-to-one index whose inverse is known: the backward is
    another ``index_select`` (index_select's own backward is an atomic ``index_add_`` into a
    zeroed buffer, 94 us per (16 x 2048, 384) float32 gradient on an H200)."""

    @staticmethod
    def forward(ctx, x2, rows, inv_rows, B, n, N):
        ctx.save_for_backward(inv_rows)
        ctx.dims = (B, n, N)
        return x2.index_select(0, rows)

    @staticmethod
    def backward(ctx, g):
        (inv_rows,) = ctx.saved_tensors
        B, n, N = ctx.dims
        gx = g.index_select(0, inv_rows)  # (B * n, ...): the picked rows of x
        if n < N:  # x rows past the picked ones (padding) get zero gradient
            gx = gx.view(B, n, *g.shape[1:])
            gx = torch.cat([gx, gx.new_zeros(B, N - n, *g.shape[1:])], dim=1)
        return gx.view(B * N, *g.shape[1:]), None, None, None, None, None


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x: (B, N, ...) , idx: (B, N') -> (B, N', ...) rows of x.

    One ``index_select`` over the flattened (B * N, ...) rows: its backward keeps only the index
    and x's sizes, where ``torch.gather`` keeps all of x (for an aff_small training forward at
    512 px, 413.5 -> 409.5 MiB saved per image, CPU count, docs/BENCHMARKS.md).

    ``inverse`` (B, n) with n <= N: when ``idx`` picks each of x's first n rows exactly once
    (N' = n) and ``idx[b, inverse[b, s]] = s``, the backward gathers with it instead of
    scattering with atomics; rows >= n (padding) get zero gradient.
    """
    B, N = x.shape[:2]
    rows = _flat_rows(idx, N)
    x2 = x.reshape(B * N, *x.shape[2:])
    if inverse is None or not torch.is_grad_enabled() or not x.requires_grad:
        return x2.index_select(0, rows).view(*idx.shape, *x.shape[2:])
    n = inverse.shape[1]
    if inverse.shape[0] != B or idx.shape[1] != n or n > N:
        raise ValueError(f"inverse {tuple(inverse.shape)} does not invert idx "
                         f"{tuple(idx.shape)} over x {tuple(x.shape[:2])}")
    out = _PermutedRows.apply(x2, rows, _flat_rows(inverse, n), B, n, N)
    return out.view(*idx.shape, *x.shape[2:])


def pad_tokens(x: torch.Tensor, n_total: int) -> torch.Tensor:
    """Pad (B, N, ...) to (B, n_total, ...) by repeating the last token (finite, later masked)."""
    N = x.shape[1]
    if n_total == N:
        return x
    last = x[:, N - 1 : N].expand(-1, n_total - N, *x.shape[2:])
    return torch.cat([x, last], dim=1)
