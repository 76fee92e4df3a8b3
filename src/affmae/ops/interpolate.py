"""Point interpolation for the deformable decoder (AFFMAE sec. 3.2, eq. 2; DESIGN 2.5).

A sampling point q reads the K nearest tokens of a point set, weighted by w = softmax(-p * d)
with learnable temperature p (the stable form; inverse-distance weights are not fp16-safe).

Nearest-token search, never a scan of every token for every point (DESIGN 2.5):
1. ``cell_neighbours``: once per token set and forward, a table of the K nearest tokens of
   every cell centre of the patch grid. Cells are grouped in 4 x 4 tiles; a tile's candidates
   are the tokens of the Kc clusters nearest to the tile centre, so the table costs
   cells x Kc*m distances (at 512 px: 4096 x 96 per image), independent of the number of
   sampling points, and the four decoder blocks' self-attention share one table. On CUDA one
   Triton kernel ranks the candidates (``affmae::cell_table``: distances in registers, the
   same slots as ``rank_cell_candidates``, the PyTorch reference and CPU path).
2. ``lookup_neighbours``: a sampling point takes the table row of the cell it falls in
   (clamped to the grid). The rows are exact K-nearest sets for cell centres (tested against
   a brute-force scan); for a point elsewhere in the cell they are the neighbours of its cell
   centre, at most half a cell away, and the weights use the point's true distances. On CUDA
   one Triton kernel does the rounding, clamping and row copy (``affmae::cell_lookup``).
The selection is not differentiable; the distances are, so gradients reach the sampling
offsets and the temperature.

Weights: ``interpolation_weights`` (times the decoder's per-point weights) is one Triton kernel
each way on CUDA (``affmae::interp_weights_fwd`` / ``_bwd``: distances and softmax in registers,
recomputed in the backward); ``interpolation_weights_reference`` is the PyTorch specification,
and the CPU path runs the same arithmetic in PyTorch ops. The weighted sum of the selected
tokens is ``gather_weighted`` (``affmae.ops.point_gather``).

The decoder calls ``deformable_weights``: from its projection's raw offsets and point logits,
the sampling points, their cells' slots (``lookup_neighbours``), the point softmax and
``interpolation_weights``. On CUDA that is one fused Triton kernel each way
(``affmae::deform_weights_fwd`` / ``_bwd``, instead of about nine kernels forward and eight
backward); ``deformable_weights_reference`` is the same steps as separate ops (the CPU path).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from affmae.ops import point_gather
from affmae.ops.clustering import Clustering, nearest_clusters
from affmae.ops.dispatch import KERNELS_ENV, package_kernels, plain_eager, triton_device
from affmae.ops.smallest_k import MAX_K, MAX_N, smallest_k

FAR = 1.0e6  # position of padding slots: never nearer than a real token
TILE = 4  # cells per tile side in the neighbour table


def cell_neighbours(key_cl: Clustering, key_pos: torch.Tensor, grid_hw: tuple[int, int],
                    k: int, num_clusters: int) -> torch.Tensor:
    """K nearest key slots of every cell centre of the grid.

    Args:
        key_cl: clustering of the key set; key_pos: (B, Mk*m, 2) clustered positions with
            padding slots at FAR.
        grid_hw: (gh, gw) patch grid. k: neighbours per cell. num_clusters: Kc searched per tile.
    Returns:
        (B, gh*gw, min(k, Kc*m)) int32 key slots, nearest first, raster order of cells (int32:
        the decoder's attentions keep the looked-up slots for their backward).
    """
    gh, gw = grid_hw
    dev = key_pos.device
    with torch.no_grad():
        # 1. Tile centres (a cached table per grid) and the key clusters nearest to each.
        centre = _tile_centres(gh, gw, str(dev))  # (1, T, 2), broadcast over the batch
        nbr = nearest_clusters(centre, key_cl.centroids, num_clusters)  # (B, T, Kc)
        m = key_cl.m
        cand = (nbr[..., None] * m + torch.arange(m, device=dev)).flatten(2)  # (B, T, Kc*m)
        k = min(k, cand.shape[-1])
        if _fused_table_ok(key_pos, cand, k):  # step 2 in one kernel, the same slots
            from affmae.ops._cell_table_kernel import cell_table_triton

            return cell_table_triton(cand, key_pos.float(), gh, gw, TILE, k)
        return rank_cell_candidates(cand, key_pos, gh, gw, k)


@functools.lru_cache(maxsize=32)
def _tile_centres(gh: int, gw: int, device: str) -> torch.Tensor:
    """(1, T, 2) float32 centres of the TILE x TILE tiles of a gh x gw grid (raster order),
    clamped into the grid. A pure function of the grid, built on the CPU and copied once per
    (size, device), as ``curve_rank``'s table (ten small kernels per table and step before)."""
    th, tw = math.ceil(gh / TILE), math.ceil(gw / TILE)
    ty, tx = torch.meshgrid(torch.arange(th), torch.arange(tw), indexing="ij")
    cx0 = (tx * TILE + (TILE - 1) / 2).clamp(max=gw - 1)  # tile centre, inside the grid
    cy0 = (ty * TILE + (TILE - 1) / 2).clamp(max=gh - 1)
    return torch.stack([cx0, cy0], -1).float().view(1, -1, 2).to(device)


def rank_cell_candidates(cand: torch.Tensor, key_pos: torch.Tensor, gh: int, gw: int,
                         k: int) -> torch.Tensor:
    """Step 2 of ``cell_neighbours`` in PyTorch (the reference of the Triton kernel): each cell
    ranks its tile's candidates (B, T, C) by squared distance to its centre -> (B, gh*gw, k)
    int32."""
    B, dev = key_pos.shape[0], key_pos.device
    tw = math.ceil(gw / TILE)
    cy, cx = torch.meshgrid(torch.arange(gh, device=dev), torch.arange(gw, device=dev),
                            indexing="ij")
    tile = ((cy // TILE) * tw + cx // TILE).reshape(-1)  # (cells,)
    cand = cand[:, tile]  # (B, cells, C)
    cpos = torch.gather(key_pos.float(), 1, cand.reshape(B, -1, 1).expand(-1, -1, 2))
    cells = torch.stack([cx, cy], -1).reshape(1, -1, 1, 2).float()  # (1, cells, 1, 2)
    d2 = (cpos.view(B, gh * gw, -1, 2) - cells).square().sum(-1)  # (B, cells, C)
    idx = smallest_k(d2, k)  # ties -> lower candidate slot, on every device
    return torch.gather(cand, 2, idx).to(torch.int32)  # (B, cells, k)


def _fused_table_ok(key_pos: torch.Tensor, cand: torch.Tensor, k: int) -> bool:
    """Whether ``cell_neighbours`` may rank with the Triton kernel (CUDA, or the interpreter;
    the candidate rows and k within ``smallest_k``'s kernel limits)."""
    if not triton_device(key_pos) or not package_kernels():
        return False
    if cand.shape[-1] > MAX_N or k > MAX_K or cand.numel() == 0:
        return False
    try:
        from affmae.ops import _cell_table_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def lookup_neighbours(points: torch.Tensor, table: torch.Tensor,
                      grid_hw: tuple[int, int]) -> torch.Tensor:
    """Table rows of the cells that sampling points fall in.

    Args:
        points: (B, Nq, S, 2) sampling points (x, y) in patch units.
        table: (B, gh*gw, K) from ``cell_neighbours``.
    Returns:
        (B, Nq, S, K) key slots in the table's dtype.
    """
    if not _lookup_kernel_ok(points, table):
        return lookup_neighbours_reference(points, table, grid_hw)
    from affmae.ops._cell_lookup_kernel import cell_lookup_triton  # one kernel, the same slots

    B, Nq, S, _ = points.shape
    with torch.no_grad():
        out = cell_lookup_triton(points.reshape(B, Nq * S, 2), table, grid_hw[0], grid_hw[1])
    return out.view(B, Nq, S, -1)


def lookup_neighbours_reference(points: torch.Tensor, table: torch.Tensor,
                                grid_hw: tuple[int, int]) -> torch.Tensor:
    """``lookup_neighbours`` in PyTorch ops (the CPU path and the kernel's reference)."""
    B, Nq, S, _ = points.shape
    gh, gw = grid_hw
    with torch.no_grad():
        x = points[..., 0].round().clamp(0, gw - 1).long()
        y = points[..., 1].round().clamp(0, gh - 1).long()
        cell = (y * gw + x).view(B, Nq * S, 1).expand(-1, -1, table.shape[-1])
        return torch.gather(table, 1, cell).view(B, Nq, S, -1)


def _lookup_kernel_ok(points: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether ``lookup_neighbours`` may use the Triton kernel (CUDA or the interpreter, float32
    points, an integer table of at most 64 slots per cell)."""
    if not triton_device(points) or not package_kernels() or points.dtype != torch.float32:
        return False
    if table.dtype not in (torch.int32, torch.int64) or not 1 <= table.shape[-1] <= 64:
        return False
    try:
        from affmae.ops import _cell_lookup_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def _f32(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 if it already is (so checks can run in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _distances(points: torch.Tensor, sel: torch.Tensor, key_pos: torch.Tensor):
    """(distance (B, Nq, H, Pt, K), offset point - key (B, Nq, H, Pt, K, 2)), float32."""
    B = points.shape[0]
    spos = torch.gather(_f32(key_pos), 1, sel.reshape(B, -1, 1).long().expand(-1, -1, 2))
    diff = _f32(points)[..., None, :] - spos.view(*sel.shape, 2)
    return diff.square().sum(-1).add(1e-6).sqrt(), diff


def interpolation_weights_reference(points: torch.Tensor, sel: torch.Tensor, key_pos: torch.Tensor,
                                    temperature: torch.Tensor,
                                    attn: torch.Tensor | None = None) -> torch.Tensor:
    """``interpolation_weights`` written as plain autograd ops (the specification; it keeps the
    (.., K, 2) offsets and the distances for its backward)."""
    d, _ = _distances(points, sel, key_pos)
    w = torch.softmax(-_f32(temperature).view(1, 1, -1, 1, 1) * d, dim=-1)
    return w if attn is None else attn[..., None] * w


_WEIGHTS_MAX_K = 64  # selected tokens per sampling point the weight kernels take


def _weights_kernel_why_not(points, sel, key_pos, temperature, attn) -> str | None:
    """Reason the Triton kernels cannot compute these weights, or None when they can."""
    if not triton_device(points):
        return f"inputs are on {points.device.type}, not CUDA"
    if any(t is not None and t.dtype != torch.float32 for t in (points, key_pos, temperature, attn)):
        return "the kernels take float32 points, positions, temperatures and attention weights"
    if not 1 <= sel.shape[-1] <= _WEIGHTS_MAX_K:
        return f"K={sel.shape[-1]} selected tokens is outside [1, {_WEIGHTS_MAX_K}]"
    if sel[..., 0].numel() >= 2**31:
        return f"{sel[..., 0].numel()} sampling points exceed the kernels' int32 row index"
    try:
        from affmae.ops import _interp_weights_kernel  # noqa: F401
    except ImportError as e:
        return f"the Triton kernels are unavailable ({e})"
    return None



class _InterpolationWeights(torch.autograd.Function):
    """attn * softmax(-p d) that keeps only its inputs for the backward and recomputes the
    distances there: the plain form saved three float32 (B, Nq, H, Pt, K) tensors per decoder
    attention (18 MiB per image for aff_small at 512 px), cheap to recompute. With ``kernel``
    the forward and backward are one Triton kernel each (``_interp_weights_kernel``);
    otherwise the same arithmetic in PyTorch ops."""

    @staticmethod
    def forward(ctx, points, sel, key_pos, temperature, attn, kernel):
        ctx.kernel = kernel
        ctx.save_for_backward(points, sel, key_pos, temperature, attn)
        if kernel:
            from affmae.ops import _interp_weights_kernel as K

            a = attn if attn is not None else points.new_ones(sel.shape[:-1])
            if plain_eager(points, sel, key_pos, temperature, a):
                return K.interp_weights_fwd(points, sel, key_pos, temperature, a)
            return torch.ops.affmae.interp_weights_fwd(points, sel, key_pos, temperature, a)
        return interpolation_weights_reference(points, sel, key_pos, temperature, attn)

    @staticmethod
    def backward(ctx, gw):
        points, sel, key_pos, temperature, attn = ctx.saved_tensors
        need_p, _, _, need_t, need_a, _ = ctx.needs_input_grad
        if ctx.kernel:
            from affmae.ops import _interp_weights_kernel as K

            a = attn if attn is not None else points.new_ones(sel.shape[:-1])
            args = (gw, points, sel, key_pos, temperature, a)
            if plain_eager(*args):
                g_points, g_temp, g_attn = K.interp_weights_bwd(*args)
            else:
                g_points, g_temp, g_attn = torch.ops.affmae.interp_weights_bwd(*args)
        else:
            d, diff = _distances(points, sel, key_pos)
            w = torch.softmax(-_f32(temperature).view(1, 1, -1, 1, 1) * d, dim=-1)
            g_attn = None
            if attn is not None:
                g_attn = (gw * w).sum(-1)
                gw = gw * attn[..., None]
            gz = w * (gw - (w * gw).sum(-1, keepdim=True))  # softmax backward, z = -p d
            gd = gz * -_f32(temperature).view(1, 1, -1, 1, 1)
            g_points = ((gd / d)[..., None] * diff).sum(-2)  # dd/dp = diff / d
            g_temp = -(gz * d).sum((0, 1, 3, 4))
        return (g_points.to(points.dtype) if need_p else None, None, None,
                g_temp.to(temperature.dtype) if need_t else None,
                g_attn.to(attn.dtype) if need_a else None, None)


def interpolation_weights(points: torch.Tensor, sel: torch.Tensor, key_pos: torch.Tensor,
                          temperature: torch.Tensor, attn: torch.Tensor | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """attn * softmax(-p * distance) over the selected tokens.

    Args:
        points: (B, Nq, H, Pt, 2). sel: (B, Nq, H, Pt, K) key slots. key_pos: (B, Nk, 2).
        temperature: (H,) positive p per head. attn: optional (B, Nq, H, Pt) weights of the
            points (the decoder's softmax over its Pt points), multiplied in.
        backend: "auto" (Triton kernels on CUDA float32 inputs, PyTorch ops otherwise),
            "triton" or "torch".
    Returns:
        (B, Nq, H, Pt, K) float32 weights (summing to attn per point); the backward recomputes
        the distances (``interpolation_weights_reference`` is the same function in plain
        autograd ops).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if key_pos.requires_grad:  # positions never take gradients in the models; stay general
        if backend == "triton":
            raise RuntimeError("backend='triton' requested but key positions require gradients")
        return interpolation_weights_reference(points, sel, key_pos, temperature, attn)
    kernel = False
    if backend == "triton" or (backend == "auto" and package_kernels()):
        reason = _weights_kernel_why_not(points, sel, key_pos, temperature, attn)
        if reason and backend == "triton":
            raise RuntimeError(f"backend='triton' requested but {reason}")
        if reason and points.is_cuda:
            warnings.warn(f"interpolation_weights: backend 'auto' uses 'torch' because {reason}",
                          stacklevel=2)
        kernel = reason is None
    return _InterpolationWeights.apply(points, sel, key_pos, temperature, attn, kernel)


def deformable_weights_reference(offlog: torch.Tensor, qpos: torch.Tensor,
                                 log_temp: torch.Tensor, key_pos: torch.Tensor,
                                 table: torch.Tensor, grid_hw: tuple[int, int], spacing: float,
                                 heads: int, points: int, backend: str = "torch"
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``deformable_weights`` as separate ops (the specification and the CPU path): points from
    the offsets, their cells' slots (``lookup_neighbours``), the point softmax and
    ``interpolation_weights``. ``backend`` "torch" uses the PyTorch form of every step; "auto"
    lets each step take its own kernel (the fallback of the fused kernel on CUDA)."""
    B, Nq, _ = offlog.shape
    H, Pt = heads, points
    off, logits = offlog.split([H * Pt * 2, H * Pt], dim=-1)
    off = off.reshape(B, Nq, H, Pt, 2).float() * spacing
    pts = qpos.float()[:, :, None, None, :] + off  # (B, Nq, H, Pt, 2)
    lookup = lookup_neighbours_reference if backend == "torch" else lookup_neighbours
    sel = lookup(pts.view(B, Nq, H * Pt, 2), table, grid_hw).view(B, Nq, H, Pt, -1)
    # float32 softmax; the dtype argument casts inside the kernel (one kernel each way)
    attn = torch.softmax(logits.reshape(B, Nq, H, Pt), dim=-1, dtype=torch.float32)
    w = interpolation_weights(pts / spacing, sel, key_pos / spacing, log_temp.exp(), attn,
                              backend="torch" if backend == "torch" else "auto")
    return sel, w


def _deformable_kernel_why_not(offlog, qpos, log_temp, key_pos, table, heads, points) -> str | None:
    """Reason the fused Triton kernels cannot run on these inputs, or None when they can."""
    if not triton_device(offlog):
        return f"inputs are on {offlog.device.type}, not CUDA"
    if offlog.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"offsets and logits are {offlog.dtype}, not float32/bfloat16/float16"
    if any(t.dtype != torch.float32 for t in (qpos, log_temp, key_pos)):
        return "the kernels take float32 query positions, key positions and log temperatures"
    if qpos.requires_grad or key_pos.requires_grad:
        return "positions that require gradients (the kernels give none)"
    if table.dtype not in (torch.int32, torch.int64) or not 1 <= table.shape[-1] <= _WEIGHTS_MAX_K:
        return f"the neighbour table must be int32/int64 with 1..{_WEIGHTS_MAX_K} slots per cell"
    if not 1 <= points <= 16:
        return f"{points} points per head is outside [1, 16]"
    if offlog.shape[0] * offlog.shape[1] * heads >= 2**31:
        return "more groups than the kernels' int32 index"
    try:
        from affmae.ops import _deform_weights_kernel  # noqa: F401
    except ImportError as e:
        return f"the Triton kernels are unavailable ({e})"
    return None


class _DeformableWeights(torch.autograd.Function):
    """The fused kernels (``_deform_weights_kernel``): one launch forward and one backward. The
    backward keeps only the inputs and the slots and recomputes points, softmaxes and
    distances; it returns the offsets' and logits' gradient as one tensor in offlog's layout."""

    @staticmethod
    def forward(ctx, offlog, qpos, log_temp, key_pos, table, grid_hw, spacing, heads, points):
        from affmae.ops import _deform_weights_kernel as K

        args = (offlog, qpos, log_temp, key_pos, table, grid_hw[0], grid_hw[1], float(spacing),
                heads, points)
        eager = plain_eager(offlog, qpos, log_temp, key_pos, table)
        sel, w = (K.deform_weights_fwd if eager else torch.ops.affmae.deform_weights_fwd)(*args)
        ctx.save_for_backward(offlog, qpos, log_temp, key_pos, sel)
        ctx.spacing = float(spacing)
        ctx.mark_non_differentiable(sel)
        return sel, w

    @staticmethod
    def backward(ctx, _g_sel, gw):
        from affmae.ops import _deform_weights_kernel as K

        offlog, qpos, log_temp, key_pos, sel = ctx.saved_tensors
        if gw is None:
            gw = torch.zeros(sel.shape, dtype=torch.float32, device=sel.device)
        args = (gw, offlog, qpos, log_temp, key_pos, sel, ctx.spacing)
        eager = plain_eager(*args[:-1])
        fn = K.deform_weights_bwd if eager else torch.ops.affmae.deform_weights_bwd
        d_ol, d_lt = fn(*args)
        need = ctx.needs_input_grad
        return (d_ol if need[0] else None, None, d_lt.to(log_temp.dtype) if need[2] else None,
                None, None, None, None, None, None)


def deformable_weights(offlog: torch.Tensor, qpos: torch.Tensor, log_temp: torch.Tensor,
                       key_pos: torch.Tensor, table: torch.Tensor, grid_hw: tuple[int, int],
                       spacing: float, heads: int, points: int, backend: str = "auto"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling slots and weights of a deformable attention from its projection's outputs.

    For head h of query q, point p: point = qpos + offset * spacing; slots = the K table rows of
    the point's grid cell (``lookup_neighbours``); weight of slot k = softmax_p(logit)_p *
    softmax_k(-exp(log_temp_h) * |point - key_pos[slot]| / spacing).

    Args:
        offlog: (B, Nq, H*Pt*3): per head and point the (x, y) offset in units of ``spacing``
            (the first H*Pt*2 columns, interleaved), then the H*Pt point logits; any float dtype,
            typically a column slice of the decoder's fused projection.
        qpos: (B, Nq, 2) float32 query positions (patch units). log_temp: (H,).
        key_pos: (B, Nk, 2) key positions (FAR at padding). table: (B, gh*gw, K) int from
            ``cell_neighbours``. spacing: typical distance between keys (patch units).
        backend: "auto" (the fused Triton kernels on CUDA, one launch each way; the separate
            ops elsewhere), "triton" or "torch" (``deformable_weights_reference``).
    Returns:
        slots (B, Nq, H, Pt, K) in the table's dtype, weights (B, Nq, H, Pt, K) float32.
        Gradients reach offlog and log_temp.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return deformable_weights_reference(offlog, qpos, log_temp, key_pos, table, grid_hw,
                                            spacing, heads, points)
    if backend == "auto" and not package_kernels():
        reason = f"{KERNELS_ENV}=torch"
    else:
        reason = _deformable_kernel_why_not(offlog, qpos, log_temp, key_pos, table, heads, points)
        if reason and backend == "triton":
            raise RuntimeError(f"backend='triton' requested but {reason}")
    if reason is None:
        return _DeformableWeights.apply(offlog, qpos, log_temp, key_pos, table, tuple(grid_hw),
                                        spacing, heads, points)
    if offlog.is_cuda and package_kernels():  # chosen by the user otherwise: no warning
        warnings.warn(f"deformable_weights: backend 'auto' uses separate ops because {reason}",
                      stacklevel=2)
    return deformable_weights_reference(offlog, qpos, log_temp, key_pos, table, grid_hw,
                                        spacing, heads, points, backend="auto")


def gather_weighted(table: torch.Tensor, sel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[..., k] * table[b, sel[..., k], h] without materialising the gathered rows.

    Delegates to ``affmae.ops.point_gather.gather_weighted`` (backend "auto": the Triton kernel on
    CUDA, the ``embedding_bag`` reference elsewhere; ``AFFMAE_POINT_GATHER_BACKEND`` overrides).

    Args:
        table: (B, Nk, H, F) per-head key features. sel: (B, Nq, H, Pt, K) key slots.
        weights: (B, Nq, H, Pt, K).
    Returns:
        (B, Nq, H, Pt, F) in table's dtype.
    """
    return point_gather.gather_weighted(table, sel, weights)
