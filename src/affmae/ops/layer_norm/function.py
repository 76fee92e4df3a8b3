"""LayerNorm, Triton backend: two custom ops (torch.compile and fake tensors see them) and the
autograd Function tying them together; eager calls go straight to the launchers."""

from __future__ import annotations

from typing import Optional

import torch

from affmae.ops.dispatch import plain_eager
from affmae.ops.layer_norm import kernel

Tensor = torch.Tensor


@torch.library.custom_op("affmae::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return kernel.forward(x, weight, bias, eps, out_dtype)


@layer_norm_fwd.register_fake
def _fwd_fake(x, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(M, dtype=torch.float32),
            x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("affmae::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor) -> tuple[Tensor, Tensor]:
    """-> dx and the (2, N) float32 d_weight / d_bias (one tensor: a custom op's outputs may
    not alias one another, and the kernel reduces both in one launch)."""
    return kernel.backward(dy, x, weight, mean, rstd)


@layer_norm_bwd.register_fake
def _bwd_fake(dy, x, weight, mean, rstd):
    return torch.empty_like(x), weight.new_empty(2, x.shape[-1], dtype=torch.float32)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        if plain_eager(x, weight, bias):
            y, mean, rstd = kernel.forward(x, weight, bias, eps, out_dtype)
        else:
            y, mean, rstd = torch.ops.affmae.layer_norm_fwd(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        if plain_eager(dy, x, weight):
            dx, dwb = kernel.backward(dy, x, weight, mean, rstd)
        else:
            dx, dwb = torch.ops.affmae.layer_norm_bwd(dy, x, weight, mean, rstd)
        return dx, dwb[0].to(weight.dtype), dwb[1].to(weight.dtype), None, None


def layer_norm_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                      out_dtype: torch.dtype) -> Tensor:
    return LayerNormFunction.apply(x, weight, bias, eps, out_dtype)


# Residual add + LayerNorm: s = x + branch (* per-sample scale), y = norm(s).
@torch.library.custom_op("affmae::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: Tensor, branch: Tensor, scale: Optional[Tensor], weight: Tensor,
                       bias: Tensor, eps: float, out_dtype: torch.dtype
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernel.add_forward(x, branch, scale, weight, bias, eps, out_dtype)


@add_layer_norm_fwd.register_fake
def _add_fwd_fake(x, branch, scale, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype)),
            x.new_empty(x.shape, dtype=out_dtype), x.new_empty(M, dtype=torch.float32),
            x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("affmae::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: Tensor, ds: Optional[Tensor], s: Tensor, weight: Tensor,
                       mean: Tensor, rstd: Tensor, scale: Optional[Tensor],
                       branch_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return kernel.add_backward(dy, ds, s, weight, mean, rstd, scale, branch_dtype)


@add_layer_norm_bwd.register_fake
def _add_bwd_fake(dy, ds, s, weight, mean, rstd, scale, branch_dtype):
    return (torch.empty_like(s), s.new_empty(s.shape, dtype=branch_dtype),
            weight.new_empty(2, s.shape[-1], dtype=torch.float32))


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, scale, weight, bias, eps, out_dtype):
        if plain_eager(x, branch, weight, bias):
            s, y, mean, rstd = kernel.add_forward(x, branch, scale, weight, bias, eps, out_dtype)
        else:
            s, y, mean, rstd = torch.ops.affmae.add_layer_norm_fwd(x, branch, scale, weight,
                                                                   bias, eps, out_dtype)
        ctx.save_for_backward(s, weight, mean, rstd, scale)
        ctx.dtypes = (x.dtype, branch.dtype)
        ctx.set_materialize_grads(False)
        return s, y

    @staticmethod
    def backward(ctx, ds, dy):
        s, weight, mean, rstd, scale = ctx.saved_tensors
        x_dtype, branch_dtype = ctx.dtypes
        if dy is None:
            dy = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
        if plain_eager(dy, s, weight) and (ds is None or plain_eager(ds)):
            dx, dbr, dwb = kernel.add_backward(dy, ds, s, weight, mean, rstd, scale,
                                               branch_dtype)
        else:
            dx, dbr, dwb = torch.ops.affmae.add_layer_norm_bwd(dy, ds, s, weight, mean, rstd,
                                                               scale, branch_dtype)
        return (dx.to(x_dtype), dbr, None, dwb[0].to(weight.dtype), dwb[1].to(weight.dtype),
                None, None)


def add_layer_norm_triton(x: Tensor, branch: Tensor, scale: Tensor | None, weight: Tensor,
                          bias: Tensor, eps: float, out_dtype: torch.dtype
                          ) -> tuple[Tensor, Tensor]:
    """(s, y): s = x + branch * scale[sample] (scale None: 1), y = LayerNorm(s) in
    ``out_dtype``; one kernel each way."""
    return AddLayerNormFunction.apply(x, branch, scale, weight, bias, eps, out_dtype)
