"""Weighted point gather, Triton backend: custom ops, FLOP formulas and the autograd Function.

The kernels of ``kernel.py`` are wrapped as two ``torch.library`` custom ops,
``affmae::point_gather_fwd`` and ``affmae::point_gather_bwd``, each with a fake (meta)
implementation, so ``torch.compile`` traces through them without graph breaks, and with a FLOP
formula (``torch.utils.flop_counter.register_flop_formula``), so FLOP counters see them (DESIGN
section 3: every custom op registers its FLOPs).
``PointGatherFunction`` (one ``torch.autograd.Function``) ties the two ops together.

FLOP convention (2 FLOPs per multiply-add), per sampling-point row (B * Nq * H * Pt rows):
forward 2 * K * F (K weighted row adds); backward 4 * K * F (the d_weights dot products and the
weighted scatter of dO), counted whole even when only one of the two gradients is asked for.

Host overhead: in plain eager mode (not compiling, no dispatch mode such as FlopCounterMode or
FakeTensorMode active, no functorch transform, plain tensors) the Function calls the launchers
directly instead of going through the custom ops' Python dispatch; the kernels are the same
(as ``cluster_attention/function.py`` does, for the same measured reason).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from affmae.ops.dispatch import plain_eager
from affmae.ops.point_gather import kernel

Tensor = torch.Tensor


@torch.library.custom_op("affmae::point_gather_fwd", mutates_args=())
def point_gather_fwd(table: Tensor, sel: Tensor, weights: Tensor) -> Tensor:
    """Forward: (B, Nq, H, Pt, F) in table's dtype."""
    return kernel.gather_forward(table, sel, weights)


@point_gather_fwd.register_fake
def _fwd_fake(table, sel, weights):
    B, Nq, H, Pt, _ = weights.shape
    return table.new_empty(B, Nq, H, Pt, table.shape[-1])


@torch.library.custom_op("affmae::point_gather_bwd", mutates_args=())
def point_gather_bwd(do: Tensor, table: Tensor, sel: Tensor, weights: Tensor,
                     need_table: bool, need_weights: bool, dtable: str) -> tuple[Tensor, Tensor]:
    """Backward: d_table (table's shape and dtype) and d_weights (weights' shape and dtype); a
    gradient not asked for is an empty tensor. ``dtable``: "atomic", "sorted" or "window"
    (kernel.py)."""
    return kernel.gather_backward(do, table, sel, weights, need_table, need_weights, dtable)


@point_gather_bwd.register_fake
def _bwd_fake(do, table, sel, weights, need_table, need_weights, dtable):
    d_table = torch.empty_like(table) if need_table else table.new_empty(0)
    d_weights = torch.empty_like(weights) if need_weights else weights.new_empty(0)
    return d_table, d_weights


def _rows_times_kf(table_shape, weights_shape) -> int:
    return math.prod(weights_shape) * table_shape[-1]  # rows * K * F (shared slots: same count)


@register_flop_formula(torch.ops.affmae.point_gather_fwd)
def _fwd_flop(table_shape, sel_shape, weights_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _rows_times_kf(table_shape, weights_shape)


@register_flop_formula(torch.ops.affmae.point_gather_bwd)
def _bwd_flop(do_shape, table_shape, sel_shape, weights_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * _rows_times_kf(table_shape, weights_shape)


class PointGatherFunction(torch.autograd.Function):
    """Autograd over the two custom ops. ``sel`` gets no gradient."""

    @staticmethod
    def forward(ctx, table, sel, weights, dtable):
        if plain_eager(table, sel, weights):
            out = kernel.gather_forward(table, sel, weights)
        else:
            out = torch.ops.affmae.point_gather_fwd(table, sel, weights)
        ctx.save_for_backward(table, sel, weights)
        ctx.dtable = dtable
        return out

    @staticmethod
    def backward(ctx, do):
        table, sel, weights = ctx.saved_tensors
        need_table, _, need_weights, _ = ctx.needs_input_grad
        if not (need_table or need_weights):
            return None, None, None, None
        args = (do, table, sel, weights, need_table, need_weights, ctx.dtable)
        if plain_eager(do, table, sel, weights):
            d_table, d_weights = kernel.gather_backward(*args)
        else:
            d_table, d_weights = torch.ops.affmae.point_gather_bwd(*args)
        return (d_table if need_table else None), None, (d_weights if need_weights else None), None


def gather_weighted_triton(table: Tensor, sel: Tensor, weights: Tensor, dtable: str = "atomic") -> Tensor:
    """Weighted point gather through the Triton kernels (same signature and result as
    ``gather_weighted_ref``).

    Args:
        table: (B, Nk, H, F) float32 / bfloat16 / float16. sel: (B, Nq, H, Pt, K) int slots, or
            (B, Nq, H, 1, K) shared by the Pt weight sets (token merging).
        weights: (B, Nq, H, Pt, K) (float32 in the model).
        dtable: how the backward forms d_table: "atomic" (float32 atomics, default, measured
            faster) or "sorted" (stable sort + segment sums, deterministic); docs/BENCHMARKS.md.
    Returns:
        (B, Nq, H, Pt, F) in table's dtype.
    """
    if dtable not in kernel.DTABLE_MODES:
        raise ValueError(f"dtable must be one of {kernel.DTABLE_MODES}, got {dtable!r}")
    return PointGatherFunction.apply(table, sel, weights, dtable)
