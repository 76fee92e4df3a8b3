"""Linear, Triton bias gradient: the column-sum custom op (torch.compile and fake tensors see it)
and the autograd Function; eager calls go straight to the launcher.

The matrix products are the ones ``F.linear`` runs (``addmm`` / ``mm`` on the input flattened to
2-D, and in the backward the products that torch's ``AddmmBackward0`` picks for these layouts), in
the same dtypes, so the output, dx and dW are bitwise those of ``F.linear``, with or without
autocast, for a 2-D or contiguous input. (For a non-contiguous input of 3 or more dims F.linear
folds it by ``matmul`` and adds the bias separately; here it is copied and goes through
``addmm``: the same sums, possibly rounded differently. ``Linear``'s "auto" backend keeps such
inputs on F.linear.) Only the bias gradient differs, by being more accurate: the float32 column
sum is cast once to the bias dtype, where torch rounds ``grad.sum(0)`` to the compute dtype (bf16
under autocast) before autocast's cast back to float32.

On CUDA, where a half-precision product's gradient goes to a float32 tensor (dW of a float32
weight under autocast; dx of a float32 input), the GEMM writes float32 itself (``torch.mm``'s
``out_dtype``, torch >= 2.8): one kernel instead of the product and a cast (about 100 casts per
aff_small step), and the float32 accumulation is kept instead of being rounded to bf16 / fp16
first. Those gradients are then more accurate than F.linear's, not bitwise equal (GPU tests:
float64 reference); on CPU and in the interpreter the product is cast as before.
"""

from __future__ import annotations

import contextlib

import torch

from affmae.ops.dispatch import plain_eager
from affmae.ops.linear import kernel
from affmae.ops.linear.casts import cached_cast

Tensor = torch.Tensor


@torch.library.custom_op("affmae::colsum", mutates_args=())
def colsum_op(g: Tensor) -> Tensor:
    """g (M, N) -> (N,) float32 column sums."""
    return kernel.colsum(g)


@colsum_op.register_fake
def _colsum_fake(g):
    return g.new_empty(g.shape[1], dtype=torch.float32)


def colsum(g: Tensor) -> Tensor:
    """The launcher in plain eager mode, else the custom op (that compilers and modes see)."""
    return kernel.colsum(g) if plain_eager(g) else torch.ops.affmae.colsum(g)


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """Autocast's cast: floating tensors other than float64 go to ``dtype``."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


_HALF = (torch.float16, torch.bfloat16)
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch >= 2.8 (CUDA kernels)


def _mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``a @ b`` in ``out_dtype``: float32 straight from the GEMM for half-precision CUDA
    operands (see the module docstring), else the product cast."""
    if out_dtype == torch.float32 and a.dtype in _HALF and a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.mm(b).to(out_dtype)


def _column_major(t: Tensor) -> bool:
    """torch's test (``mm_mat1_backward`` / ``mm_mat2_backward``) for a column-major matrix."""
    return t.stride(0) == 1 and t.stride(1) == t.shape[0]


class LinearFunction(torch.autograd.Function):
    """y = x @ weight^T + bias, the inputs cast to ``compute_dtype`` (autocast's dtype, or None
    for none) inside; gradients come back in the dtypes of the original inputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, compute_dtype, weight_cast=None, bias_cast=None):
        # weight_cast / bias_cast: the parameters already cast to compute_dtype (``casts``)
        xc = _cast(x, compute_dtype)
        wc = _cast(weight, compute_dtype) if weight_cast is None else weight_cast
        bc = _cast(bias, compute_dtype) if bias_cast is None else bias_cast
        x2 = xc.reshape(-1, xc.shape[-1])  # (M, K)
        wt = wc.t()  # (K, N)
        y2 = torch.mm(x2, wt) if bc is None else torch.addmm(bc, x2, wt)  # (M, N)
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x2 if need_w else None, wc if need_x else None)
        ctx.x_shape, ctx.x_column_major = x.shape, _column_major(x2)
        ctx.w_column_major = _column_major(wt)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y2.view(*x.shape[:-1], y2.shape[-1])  # (..., N)

    @staticmethod
    def backward(ctx, g):
        x2, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        # backward() called inside an autocast region would autocast these products too
        dev = g.device.type
        no_autocast = (torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev)
                       else contextlib.nullcontext())
        with no_autocast:
            g2 = g.reshape(-1, g.shape[-1])  # (M, N)
            # the products (and their operand order) that AddmmBackward0 uses for these layouts
            if need_x:
                dx2 = (_mm(wc.t(), g2.t(), x_dtype).t() if ctx.x_column_major
                       else _mm(g2, wc, x_dtype))  # (M, K)
                dx = dx2.reshape(ctx.x_shape)
            if need_w:
                dw = (_mm(g2.t(), x2, w_dtype) if ctx.w_column_major
                      else _mm(x2.t(), g2, w_dtype).t())  # (N, K)
            if need_b and b_dtype is not None:
                db = colsum(g2).to(b_dtype)
        return dx, dw, db, None, None, None


def linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with the Triton bias gradient. Autocast's casts are done inside the
    Function; autocast may stay on around it (its casts of the already cast operands are
    no-ops), which saves entering a context on every call."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if dtype is None:
        return LinearFunction.apply(x, weight, bias, dtype)
    # the casts made once for the whole forward (``casts.cast_weights``), where there are any
    return LinearFunction.apply(x, weight, bias, dtype, cached_cast(weight, dtype),
                                cached_cast(bias, dtype))
