"""Cluster attention, Triton backend: custom ops, FLOP formulas and the autograd Function.

The kernels of ``kernel.py`` are wrapped as ``torch.library`` custom ops,
``affmae::cluster_attention_fwd``, ``affmae::cluster_attention_bwd`` and
``affmae::cluster_attention_bwd_packed`` (the backward for a packed qkv), each with a fake
(meta) implementation, so ``torch.compile`` traces through them without graph breaks, and with a
FLOP formula (``torch.utils.flop_counter.register_flop_formula``), so FLOP counters see them
(DESIGN section 3; existing AFF counts silently omitted their custom kernels).
``ClusterAttentionFunction`` (one ``torch.autograd.Function``) ties the ops together.

Packed qkv: a fused projection gives q, k, v as slices of one (B, N, 3, H, D) tensor. Unbound
before the Function, their three gradients are stacked by autograd's ``UnbindBackward`` (one
copy kernel per attention layer); ``cluster_attention_triton_packed`` passes the packed tensor
itself, and the backward writes dq, dk, dv into the slices of one packed gradient instead.

Host overhead: in plain eager mode (not compiling, no dispatch mode such as FlopCounterMode or
FakeTensorMode active, no functorch transform, plain tensors) the Function calls the launchers
directly instead of going through the custom ops' Python dispatch; the kernels are the same.
On an H100 host the op dispatch, not the GPU, dominated eager time at these sizes.

FLOP convention (as torch counts scaled_dot_product_attention): matrix products only, 2 FLOPs per
multiply-add, over the K = Kc * m neighbour keys plus the blank key. Forward: q k^T and P v, i.e.
4 * B * N * H * (K + 1) * D. Backward: five products (q k^T recomputed, dO v^T, P^T dO, dS k,
dS^T q), 2.5x the forward. The kernels' extra work (the key-major dK / dV pass recomputes q k^T
and dO v^T; a group's tiles compute logits for the union of its clusters' neighbourhoods, masked
where a cluster does not list a key) and the bias arithmetic are not counted.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from affmae.ops.cluster_attention import kernel
from affmae.ops.dispatch import plain_eager

Tensor = torch.Tensor


@torch.library.custom_op("affmae::cluster_attention_fwd", mutates_args=())
def cluster_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, nbr: Tensor, n_valid: int,
    bias_weight: Tensor, bias_bias: Tensor, blank_k: Tensor, blank_v: Tensor, scale: float,
    grp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward: out (B, N, H, D) in q's dtype and the base-2 log-sum-exp (B, H, N) float32.
    ``grp``: the forward group structure (``kernel.attention_groups``), if known."""
    return kernel.attention_forward(
        q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale, grp=grp
    )


@cluster_attention_fwd.register_fake
def _fwd_fake(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale, grp=None):
    B, N, H, D = q.shape
    return q.new_empty(B, N, H, D), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("affmae::cluster_attention_bwd", mutates_args=())
def cluster_attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, pos: Tensor, nbr: Tensor,
    n_valid: int, bias_weight: Tensor, bias_bias: Tensor, blank_k: Tensor, blank_v: Tensor,
    scale: float, grp: Tensor | None = None, grp_t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward: dq, dk, dv and the packed (6 H + 2 H D,) float32 parameter gradients
    (``kernel.unpack_param_grads``). ``o``, ``lse``: the forward's outputs. ``grp`` / ``grp_t``:
    the group structures, if known."""
    return kernel.attention_backward(
        do, q, k, v, o, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
        grp=grp, grp_t=grp_t,
    )


@cluster_attention_bwd.register_fake
def _bwd_fake(do, q, k, v, o, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v,
              scale, grp=None, grp_t=None):
    H, D = blank_k.shape
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        q.new_empty(6 * H + 2 * H * D, dtype=torch.float32),
    )


@torch.library.custom_op("affmae::cluster_attention_bwd_packed", mutates_args=())
def cluster_attention_bwd_packed(
    do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, pos: Tensor, nbr: Tensor, n_valid: int,
    bias_weight: Tensor, bias_bias: Tensor, blank_k: Tensor, blank_v: Tensor,
    scale: float, grp: Tensor | None = None, grp_t: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Backward for q, k, v = ``qkv.unbind(2)``: dqkv (B, N, 3, H, D), contiguous, and the packed
    parameter gradients (``kernel.attention_backward_packed``)."""
    return kernel.attention_backward_packed(
        do, qkv, o, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale,
        grp=grp, grp_t=grp_t,
    )


@cluster_attention_bwd_packed.register_fake
def _bwd_packed_fake(do, qkv, o, lse, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v,
                     scale, grp=None, grp_t=None):
    H, D = blank_k.shape
    return qkv.new_empty(qkv.shape), qkv.new_empty(6 * H + 2 * H * D, dtype=torch.float32)


def _forward_flops(q_shape, nbr_shape) -> int:
    B, N, H, D = q_shape
    M, Kc = nbr_shape[1:]
    keys = Kc * (N // M) + 1  # neighbour keys + the blank key
    return 4 * B * N * H * keys * D


@register_flop_formula(torch.ops.affmae.cluster_attention_fwd)
def _fwd_flop(q_shape, k_shape, v_shape, pos_shape, nbr_shape, *args, out_shape=None, **kwargs) -> int:
    return _forward_flops(q_shape, nbr_shape)


@register_flop_formula(torch.ops.affmae.cluster_attention_bwd)
def _bwd_flop(do_shape, q_shape, k_shape, v_shape, o_shape, lse_shape, pos_shape, nbr_shape, *args,
              out_shape=None, **kwargs) -> int:
    return 5 * _forward_flops(q_shape, nbr_shape) // 2


@register_flop_formula(torch.ops.affmae.cluster_attention_bwd_packed)
def _bwd_packed_flop(do_shape, qkv_shape, o_shape, lse_shape, pos_shape, nbr_shape, *args, out_shape=None,
                     **kwargs) -> int:
    return 5 * _forward_flops(do_shape, nbr_shape) // 2  # dO has q's shape (B, N, H, D)


class ClusterAttentionFunction(torch.autograd.Function):
    """Autograd over the custom ops. Positions and neighbourhoods get no gradient.

    Tokens are q, k, v, or one packed (B, N, 3, H, D) qkv in q's place with k = v = None: its
    gradient is then the backward's packed dqkv as it is (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale, grp,
                grp_t):
        tokens = q.unbind(2) if k is None else (q, k, v)  # views of a packed qkv: no copy
        args = (*tokens, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale)
        if plain_eager(*tokens, pos, nbr):
            if grp is None:  # built once here, for the backward too
                grp = kernel.attention_groups(nbr, tokens[0].shape[1] // nbr.shape[1])
            out, lse = kernel.attention_forward(*args, grp=grp)
        else:
            out, lse = torch.ops.affmae.cluster_attention_fwd(*args, grp)
        ctx.save_for_backward(q, k, v, out, lse, pos, nbr, bias_weight, bias_bias, blank_k, blank_v,
                              grp, grp_t)
        ctx.n_valid, ctx.scale = n_valid, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, pos, nbr, bias_weight, bias_bias, blank_k, blank_v, grp, grp_t = ctx.saved_tensors
        packed = k is None  # q is the packed qkv
        tokens = (q,) if packed else (q, k, v)
        args = (do, *tokens, out, lse, pos, nbr, ctx.n_valid, bias_weight, bias_bias, blank_k, blank_v,
                ctx.scale, grp, grp_t)
        if packed:
            launch, op = kernel.attention_backward_packed, torch.ops.affmae.cluster_attention_bwd_packed
        else:
            launch, op = kernel.attention_backward, torch.ops.affmae.cluster_attention_bwd
        if plain_eager(do, *tokens, pos, nbr):  # the forward checked these tensors
            *token_grads, g = launch(*args[:-2], grp=grp, grp_t=grp_t, validate=False)
        else:
            *token_grads, g = op(*args)
        if packed:  # dqkv in q's place; k and v are None
            token_grads = (*token_grads, None, None)
        dw, dwb, dbk, dbv = kernel.unpack_param_grads(g, bias_weight, bias_bias, blank_k, blank_v)
        need = ctx.needs_input_grad
        grads = (*token_grads, None, None, None, dw, dwb, dbk, dbv, None, None, None)
        return tuple(g if n else None for g, n in zip(grads, need))


def cluster_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, nbr: Tensor, n_valid: int,
    bias_weight: Tensor, bias_bias: Tensor, blank_k: Tensor, blank_v: Tensor,
    scale: float | None = None, groups: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """Cluster attention through the Triton kernels (same signature and result as the reference).

    Args:
        q, k, v: (B, N, H, D) clustered tokens, N = M * m; slots >= n_valid are padding.
        pos: (B, N, 2) positions. nbr: (B, M, Kc) neighbour clusters, own cluster first.
        n_valid: real token count. bias_weight: (H, 5), bias_bias: (H,). blank_k, blank_v: (H, D).
        scale: logit scale (default D ** -0.5).
        groups: ``(kernel.attention_groups(nbr, m), kernel.attention_groups(nbr, m, True))``
            when the caller keeps them (either may be None: then it is built per call);
            ``Clustering.attention_groups`` shares them across a stage's blocks.
    Returns:
        (B, N, H, D) in q's dtype.
    """
    return _apply(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale, groups)


def cluster_attention_triton_packed(
    qkv: Tensor, pos: Tensor, nbr: Tensor, n_valid: int,
    bias_weight: Tensor, bias_bias: Tensor, blank_k: Tensor, blank_v: Tensor,
    scale: float | None = None, groups: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """``cluster_attention_triton`` of q, k, v = ``qkv.unbind(2)`` for a packed (B, N, 3, H, D)
    ``qkv``: the same kernels and values, but the gradient of qkv comes out of the backward as
    one packed tensor, with no stack of three (module docstring). Other arguments and the
    result as ``cluster_attention_triton``.
    """
    kernel.check_packed(qkv)
    return _apply(qkv, None, None, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v,
                  scale, groups)


def _apply(q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale, groups):
    grp, grp_t = (None, None) if groups is None else groups
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)  # D, packed or not
    return ClusterAttentionFunction.apply(
        q, k, v, pos, nbr, n_valid, bias_weight, bias_bias, blank_k, blank_v, scale, grp, grp_t
    )
