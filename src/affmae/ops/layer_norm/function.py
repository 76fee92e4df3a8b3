"""LayerNorm, Triton backend: two custom ops (torch.compile and fake tensors see them) and the
autograd Function tying them together; eager calls go straight to the launchers."""

from __future__ import annotations

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
