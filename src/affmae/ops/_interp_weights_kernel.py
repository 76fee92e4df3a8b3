"""Triton kernels of ``affmae.ops.interpolate.interpolation_weights`` (see there).

For every sampling-point row r = (b, q, h, p) of the deformable decoder and its K selected key
slots s_k:

    d_k = sqrt(|point_r - key_pos[b, s_k]|^2 + 1e-6),   w_rk = attn_r * softmax_k(-p_h * d_k)

The PyTorch form materialises float32 (rows, K, 2) offsets and (rows, K) distances and runs
23 aten ops forward and 44 backward per decoder attention (a CPU profiler count, views
included), most of them element-wise over tens of MB at 512 px (8 attentions per aff_small
step). Here one program handles BLOCK_R rows with
their K slots in registers: the forward writes w, the backward recomputes the distances and
the softmax from the inputs and writes d_points, d_attn and one temperature partial per row
(summed per head by the caller).

Rounding follows PyTorch where it can: products and sums are not contracted into FMAs
(``enable_fp_fusion=False``) and the square root is correctly rounded; ``exp`` and the
reduction order may differ by an ulp (tests: the three-way rule against float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 64
_SIZES = ["R", "HP", "QHP", "Pt", "Nk"]  # runtime sizes: never specialised (no recompiles)


@triton.jit
def _recompute(P, SEL, KP, TEMP, r, r_ok, cols, R, HP, QHP, Pt, Nk,
               K: tl.constexpr):
    """Offsets, distances, logits and softmax of BLOCK_R rows (float32 registers)."""
    ok = r_ok[:, None] & (cols[None, :] < K)
    r64 = r.to(tl.int64)
    b = (r // QHP).to(tl.int64)
    h = (r % HP) // Pt
    px = tl.load(P + r64 * 2, mask=r_ok, other=0.0)
    py = tl.load(P + r64 * 2 + 1, mask=r_ok, other=0.0)
    s = tl.load(SEL + r64[:, None] * K + cols[None, :], mask=ok, other=0).to(tl.int64)
    kx = tl.load(KP + (b * Nk)[:, None] * 2 + s * 2, mask=ok, other=0.0)
    ky = tl.load(KP + (b * Nk)[:, None] * 2 + s * 2 + 1, mask=ok, other=0.0)
    dx = px[:, None] - kx
    dy = py[:, None] - ky
    d = tl.sqrt_rn(dx * dx + dy * dy + 1e-6)
    t = tl.load(TEMP + h, mask=r_ok, other=0.0)
    z = tl.where(ok, -t[:, None] * d, float("-inf"))
    e = tl.exp(z - tl.max(z, 1)[:, None])
    e = tl.where(ok, e, 0.0)
    sm = e / tl.sum(e, 1)[:, None]
    return ok, r64, dx, dy, d, t, sm


@triton.jit
def _rows(P, SEL, KP, TEMP, A, R, HP, QHP, Pt, Nk, K: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """This program's rows, their recomputed softmax and their point weights."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    cols = tl.arange(0, BLOCK_K)
    ok, r64, dx, dy, d, t, sm = _recompute(P, SEL, KP, TEMP, r, r_ok, cols, R, HP, QHP, Pt, Nk, K)
    a = tl.load(A + r64, mask=r_ok, other=0.0)
    return r_ok, cols, ok, r64, dx, dy, d, t, sm, a


@triton.jit(do_not_specialize=_SIZES)
def _fwd_kernel(P, SEL, KP, TEMP, A, W, R, HP, QHP, Pt, Nk,
                K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r_ok, cols, ok, r64, dx, dy, d, t, sm, a = _rows(P, SEL, KP, TEMP, A, R, HP, QHP, Pt, Nk, K,
                                                     BLOCK_R, BLOCK_K)
    tl.store(W + r64[:, None] * K + cols[None, :], a[:, None] * sm, mask=ok)


@triton.jit(do_not_specialize=_SIZES)
def _bwd_kernel(GW, P, SEL, KP, TEMP, A, GP, GT, GA, R, HP, QHP, Pt, Nk,
                K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r_ok, cols, ok, r64, dx, dy, d, t, sm, a = _rows(P, SEL, KP, TEMP, A, R, HP, QHP, Pt, Nk, K,
                                                     BLOCK_R, BLOCK_K)
    gw = tl.load(GW + r64[:, None] * K + cols[None, :], mask=ok, other=0.0)
    tl.store(GA + r64, tl.sum(gw * sm, 1), mask=r_ok)  # d attn = sum_k gw * softmax
    gs = gw * a[:, None]  # gradient of the softmax
    gz = sm * (gs - tl.sum(sm * gs, 1)[:, None])  # softmax backward, z = -p d
    gd = gz * -t[:, None]
    gdd = tl.where(ok, gd / d, 0.0)
    tl.store(GP + r64 * 2, tl.sum(gdd * dx, 1), mask=r_ok)  # dd/dpoint = offset / d
    tl.store(GP + r64 * 2 + 1, tl.sum(gdd * dy, 1), mask=r_ok)
    tl.store(GT + r64, -tl.sum(tl.where(ok, gz * d, 0.0), 1), mask=r_ok)  # per-row d p


def _params(K: int) -> dict:
    block_k = max(2, triton.next_power_of_2(K))
    return dict(K=K, BLOCK_R=max(16, 1024 // block_k), BLOCK_K=block_k, num_warps=4,
                enable_fp_fusion=False)


def _sizes(sel: torch.Tensor) -> tuple[int, int, int, int, int]:
    B, Nq, H, Pt, K = sel.shape
    return B * Nq * H * Pt, H * Pt, Nq * H * Pt, Pt, K


@torch.library.custom_op("affmae::interp_weights_fwd", mutates_args=())
def interp_weights_fwd(points: torch.Tensor, sel: torch.Tensor, key_pos: torch.Tensor,
                       temperature: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """points (B, Nq, H, Pt, 2) float32, sel (B, Nq, H, Pt, K) int, key_pos (B, Nk, 2)
    float32, temperature (H,) float32, attn (B, Nq, H, Pt) float32 -> w (B, Nq, H, Pt, K)."""
    R, HP, QHP, Pt, K = _sizes(sel)
    w = torch.empty(sel.shape, device=points.device, dtype=torch.float32)
    if R:
        p = _params(K)
        _fwd_kernel[(triton.cdiv(R, p["BLOCK_R"]),)](
            points.contiguous(), sel.contiguous(), key_pos.contiguous(), temperature.contiguous(),
            attn.contiguous(), w, R, HP, QHP, Pt, key_pos.shape[1], **p)
    return w


@interp_weights_fwd.register_fake
def _fwd_fake(points, sel, key_pos, temperature, attn):
    return points.new_empty(sel.shape)


@torch.library.custom_op("affmae::interp_weights_bwd", mutates_args=())
def interp_weights_bwd(gw: torch.Tensor, points: torch.Tensor, sel: torch.Tensor,
                       key_pos: torch.Tensor, temperature: torch.Tensor,
                       attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d_points (B, Nq, H, Pt, 2), d_temperature (H,), d_attn (B, Nq, H, Pt); float32."""
    R, HP, QHP, Pt, K = _sizes(sel)
    B, Nq, H = sel.shape[:3]
    dev = points.device
    gp = torch.empty(points.shape, device=dev, dtype=torch.float32)
    gt_rows = torch.empty(B, Nq, H, Pt, device=dev, dtype=torch.float32)
    ga = torch.empty(attn.shape, device=dev, dtype=torch.float32)
    if R:
        p = _params(K)
        _bwd_kernel[(triton.cdiv(R, p["BLOCK_R"]),)](
            gw.contiguous(), points.contiguous(), sel.contiguous(), key_pos.contiguous(),
            temperature.contiguous(), attn.contiguous(), gp, gt_rows, ga,
            R, HP, QHP, Pt, key_pos.shape[1], **p)
    return gp, gt_rows.sum((0, 1, 3)), ga


@interp_weights_bwd.register_fake
def _bwd_fake(gw, points, sel, key_pos, temperature, attn):
    return points.new_empty(points.shape), points.new_empty(sel.shape[2]), attn.new_empty(attn.shape)
