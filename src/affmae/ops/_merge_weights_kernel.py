"""Triton kernels of token merging's neighbour weights (``affmae.layers.merge``, AFF sec. 3.4).

For every (kept token n, neighbour slot s) entry e of a merge:

    f_e = relpos(pos[slot_e] - pos_k[n])                 (dx, dy, r, dx / r, dy / r)
    w_e = GELU(LayerNorm_4(Linear_5->4(f_e))) * imp_e     (4 weights)

The PyTorch form (``TokenMerging``'s ``weight_net``) runs 33 aten ops forward and 35 backward
(a CPU profiler count, views included), most over (B, k, Kc*m, 5 / 4) float32 tensors, per
merge. Here one program handles
BLOCK_E entries in registers: the forward writes w; the backward recomputes everything from the
positions and writes d_imp per entry and one row of parameter-gradient partials per program
(summed by the caller). Positions get no gradient (they never do in the models).

Everything is float32, the Linear too: under autocast the PyTorch form runs that Linear in
bfloat16 / float16, so the kernels are the more accurate of the two (the tests' three-way rule
measures both against float64). Products and sums are not contracted into FMAs
(``enable_fp_fusion=False``).

Partials layout (programs, 32), parameter after parameter: dLinear.weight (4, 5) row-major,
dLinear.bias (4,) (the bias is a sixth feature fixed at 1), dLayerNorm.weight (4,),
dLayerNorm.bias (4,). Their sum splits into four contiguous gradients that autograd keeps as
they are (a (4, 8) per-row layout needed a copy of each: 12 small kernels per aff_small step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

_SIZES = ["E", "KK", "Np", "k"]  # runtime sizes: never specialised (no recompiles)


@triton.jit
def _forward_math(POS, POSK, SLOT, LW, LB, NW, NB, e, e_ok, E, KK, Np, k, eps):
    """Features (BLOCK_E, 8), LayerNorm statistics and output, GELU input/output."""
    e64 = e.to(tl.int64)
    b = e64 // (k * KK)
    n = e64 // KK  # kept token row (b * k + n_in_b)
    s = tl.load(SLOT + e64, mask=e_ok, other=0).to(tl.int64)
    px = tl.load(POS + (b * Np + s) * 2, mask=e_ok, other=0.0)
    py = tl.load(POS + (b * Np + s) * 2 + 1, mask=e_ok, other=0.0)
    qx = tl.load(POSK + n * 2, mask=e_ok, other=0.0)
    qy = tl.load(POSK + n * 2 + 1, mask=e_ok, other=0.0)
    dx = px - qx
    dy = py - qy
    r = tl.sqrt_rn(dx * dx + dy * dy)
    rc = tl.maximum(r, 1e-12)
    ux = tl.where(r > 0, dx / rc, 0.0)
    uy = tl.where(r > 0, dy / rc, 0.0)
    c = tl.arange(0, 8)
    f = tl.where(c[None, :] == 0, dx[:, None],
        tl.where(c[None, :] == 1, dy[:, None],
        tl.where(c[None, :] == 2, r[:, None],
        tl.where(c[None, :] == 3, ux[:, None],
        tl.where(c[None, :] == 4, uy[:, None], 0.0)))))
    f = tl.where(c[None, :] == 5, 1.0, f)  # the bias as a sixth feature
    j = tl.arange(0, 4)
    wmask = c[None, :] < 5
    lw = tl.load(LW + j[:, None] * 5 + c[None, :], mask=wmask, other=0.0)  # (4, 8)
    lb = tl.load(LB + j)
    lw = tl.where(c[None, :] == 5, lb[:, None], lw)
    y = tl.sum(f[:, None, :] * lw[None, :, :], 2)  # (BLOCK_E, 4)
    mu = tl.sum(y, 1) / 4
    yc = y - mu[:, None]
    rstd = tl.math.rsqrt(tl.sum(yc * yc, 1) / 4 + eps)
    yn = yc * rstd[:, None]
    nw = tl.load(NW + j)
    nb = tl.load(NB + j)
    x = yn * nw[None, :] + nb[None, :]
    g = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return e64, f, yn, rstd, nw, x, g


@triton.jit(do_not_specialize=_SIZES)
def _fwd_kernel(POS, POSK, SLOT, IMP, LW, LB, NW, NB, W, E, KK, Np, k, eps,
                BLOCK_E: tl.constexpr):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    e64, f, yn, rstd, nw, x, g = _forward_math(POS, POSK, SLOT, LW, LB, NW, NB, e, e_ok, E, KK,
                                               Np, k, eps)
    imp = tl.load(IMP + e64, mask=e_ok, other=0.0)
    j = tl.arange(0, 4)
    tl.store(W + e64[:, None] * 4 + j[None, :], g * imp[:, None], mask=e_ok[:, None])


@triton.jit(do_not_specialize=_SIZES)
def _bwd_kernel(GW, POS, POSK, SLOT, IMP, LW, LB, NW, NB, GIMP, PART, E, KK, Np, k, eps,
                BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < E
    e64, f, yn, rstd, nw, x, g = _forward_math(POS, POSK, SLOT, LW, LB, NW, NB, e, e_ok, E, KK,
                                               Np, k, eps)
    j = tl.arange(0, 4)
    imp = tl.load(IMP + e64, mask=e_ok, other=0.0)
    gw = tl.load(GW + e64[:, None] * 4 + j[None, :], mask=e_ok[:, None], other=0.0)
    tl.store(GIMP + e64, tl.sum(gw * g, 1), mask=e_ok)  # d imp = sum_j gw * gelu
    gg = gw * imp[:, None]
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    gx = gg * (cdf + x * pdf)  # GELU backward
    d_nw = tl.sum(gx * yn, 0)  # (4,)
    d_nb = tl.sum(gx, 0)
    dyn = gx * nw[None, :]
    dy = rstd[:, None] * (dyn - (tl.sum(dyn, 1) / 4)[:, None]
                          - yn * (tl.sum(dyn * yn, 1) / 4)[:, None])  # LayerNorm backward
    dy = tl.where(e_ok[:, None], dy, 0.0)
    d_lw = tl.sum(dy[:, :, None] * f[:, None, :], 0)  # (4, 8): weight columns 0-4, bias 5
    c = tl.arange(0, 8)
    part = tl.where(c[None, :] == 6, d_nw[:, None], tl.where(c[None, :] == 7, d_nb[:, None], d_lw))
    # parameter-major: weight (4, 5), then bias, LayerNorm weight, LayerNorm bias (4 each)
    slot = tl.where(c[None, :] < 5, j[:, None] * 5 + c[None, :],
                    20 + (c[None, :] - 5) * 4 + j[:, None])
    tl.store(PART + pid.to(tl.int64) * 32 + slot, part)


def _launch(E: int) -> tuple[int, dict]:
    block = 128
    return triton.cdiv(E, block), dict(BLOCK_E=block, num_warps=4, enable_fp_fusion=False)


@torch.library.custom_op("affmae::merge_weights_fwd", mutates_args=())
def merge_weights_fwd(pos: torch.Tensor, pos_k: torch.Tensor, slots: torch.Tensor,
                      imp: torch.Tensor, lin_w: torch.Tensor, lin_b: torch.Tensor,
                      norm_w: torch.Tensor, norm_b: torch.Tensor, eps: float) -> torch.Tensor:
    """pos (B, Np, 2), pos_k (B, k, 2), slots (B, k, K) int, imp (B, k, K), Linear(5 -> 4)
    and LayerNorm(4) parameters, all float32 -> w (B, k, K, 4) float32."""
    B, k, KK = slots.shape
    E = B * k * KK
    w = torch.empty(B, k, KK, 4, device=pos.device, dtype=torch.float32)
    if E:
        grid, p = _launch(E)
        _fwd_kernel[(grid,)](pos.contiguous(), pos_k.contiguous(), slots.contiguous(),
                             imp.contiguous(), lin_w.contiguous(), lin_b, norm_w, norm_b, w,
                             E, KK, pos.shape[1], k, eps, **p)
    return w


@merge_weights_fwd.register_fake
def _fwd_fake(pos, pos_k, slots, imp, lin_w, lin_b, norm_w, norm_b, eps):
    return imp.new_empty(*slots.shape, 4)


@torch.library.custom_op("affmae::merge_weights_bwd", mutates_args=())
def merge_weights_bwd(gw: torch.Tensor, pos: torch.Tensor, pos_k: torch.Tensor,
                      slots: torch.Tensor, imp: torch.Tensor, lin_w: torch.Tensor,
                      lin_b: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> d_imp (B, k, K) and the parameter gradients as one (32,) float32 tensor, parameter
    after parameter (module docstring): Linear weight (4, 5), Linear bias, LayerNorm weight, its
    bias (4 each)."""
    B, k, KK = slots.shape
    E = B * k * KK
    d_imp = torch.empty(slots.shape, device=pos.device, dtype=torch.float32)
    if not E:
        return d_imp, torch.zeros(32, device=pos.device, dtype=torch.float32)
    grid, p = _launch(E)
    part = torch.empty(grid, 32, device=pos.device, dtype=torch.float32)
    _bwd_kernel[(grid,)](gw.contiguous(), pos.contiguous(), pos_k.contiguous(), slots.contiguous(),
                         imp.contiguous(), lin_w.contiguous(), lin_b, norm_w, norm_b, d_imp, part,
                         E, KK, pos.shape[1], k, eps, **p)
    return d_imp, part.sum(0)


@merge_weights_bwd.register_fake
def _bwd_fake(gw, pos, pos_k, slots, imp, lin_w, lin_b, norm_w, norm_b, eps):
    return imp.new_empty(slots.shape), imp.new_empty(32)


def _entries(slots_shape) -> int:
    return slots_shape[0] * slots_shape[1] * slots_shape[2]


# FLOPs as the PyTorch form counts them: the Linear(5 -> 4) forward (2 * 5 * 4 per entry) and its
# weight gradient (the features need none); normalisation and GELU count zero by convention.


@register_flop_formula(torch.ops.affmae.merge_weights_fwd)
def _fwd_flop(pos_shape, pos_k_shape, slots_shape, *args, out_shape=None, **kwargs) -> int:
    return 40 * _entries(slots_shape)


@register_flop_formula(torch.ops.affmae.merge_weights_bwd)
def _bwd_flop(gw_shape, pos_shape, pos_k_shape, slots_shape, *args, out_shape=None, **kwargs) -> int:
    return 40 * _entries(slots_shape)
