"""Point-based deformable decoder (AFFMAE sec. 3.2; DESIGN 2.5).

Queries are patch positions (the masked ones in pretraining, every patch in fine-tuning): a
learned token plus a sine embedding of the position. One block per encoder stage, coarse to
fine (stage S -> 1); a block is deformable self-attention among the queries, deformable
cross-attention into that stage's tokens, and an FFN. A deformable attention head predicts Pt
sampling points q = r + offset (offsets in units of the source set's typical token spacing),
interpolates values at each point from the K nearest source tokens with
w = softmax(-p * d / spacing) (learnable p per head), and mixes its Pt values with weights
predicted from the query (Deformable-DETR form, Zhu et al. 2021).

Source tokens get a Linear to the decoder width plus a sine embedding of their positions
("encoder features are encoded with absolute positioning during cross-attention").
Deviations: DESIGN's block order (self, cross, FFN) is used; the paper's prose lists cross first.
Point weights are predicted from the query (Deformable DETR) rather than by q.k against
interpolated keys (DAT): half the interpolation traffic, no key projection, and the parameter
count of AFF-Small lands at DESIGN's ~22M.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.profiler import record_function

from affmae.layers.common import Mlp, ring_offsets, run_block, sincos_embed_2d
from affmae.ops.clustering import Clustering, balanced_clustering, gather_tokens, pad_tokens
from affmae.ops.layer_norm import FusedLayerNorm
from affmae.ops.interpolate import FAR, cell_neighbours, deformable_weights, gather_weighted
from affmae.ops.linear import Linear


class DeformableAttention(nn.Module):
    """Deformable attention of queries into a point set: ``self_attention`` (the source is the
    queries themselves) or cross-attention (the source is a stage's tokens).

    The query-side projections are one Linear, ``in_proj``: the sampling offsets (H*Pt*2,
    x/y interleaved) then the point logits (H*Pt), preceded in self-attention by the values (C).
    One GEMM, one bias-gradient sum and no per-step concatenation of weights; older checkpoints
    with separate ``value`` / ``offsets`` / ``attn_logits`` Linears load into it."""

    def __init__(self, dim: int, heads: int, points: int, knn: int,
                 self_attention: bool = False) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"decoder width {dim} is not divisible by {heads} heads")
        self.heads, self.points, self.knn = heads, points, knn
        self.head_dim = dim // heads
        self.self_attention = self_attention
        # Drawn as three Linears, in the order of the separate-projection layout, so a seed
        # gives the same initial weights as before the projections were fused.
        parts = [Linear(dim, dim)] + [Linear(dim, heads * points * n) for n in (2, 1)]
        if not self_attention:
            self.value = parts.pop(0)
        self.in_proj = Linear(dim, sum(m.out_features for m in parts), device="meta")
        self.in_proj.weight = nn.Parameter(torch.cat([m.weight.detach() for m in parts]))
        self.in_proj.bias = nn.Parameter(torch.cat([m.bias.detach() for m in parts]))
        self.log_temp = nn.Parameter(torch.zeros(heads))  # p = exp(log_temp), starts at 1
        self.proj = Linear(dim, dim)
        self.register_load_state_dict_pre_hook(self._from_separate_projections)

    def _from_separate_projections(self, module, state_dict, prefix, *args) -> None:
        """Load a checkpoint written before ``in_proj`` (separate ``value``, ``offsets`` and
        ``attn_logits`` Linears): concatenate them in ``in_proj``'s row order."""
        if prefix + "offsets.weight" not in state_dict or prefix + "in_proj.weight" in state_dict:
            return
        names = (["value"] if self.self_attention else []) + ["offsets", "attn_logits"]
        for kind in ("weight", "bias"):
            state_dict[prefix + "in_proj." + kind] = torch.cat(
                [state_dict.pop(f"{prefix}{n}.{kind}") for n in names])

    def reset_parameters(self) -> None:
        start = self.heads * self.head_dim if self.self_attention else 0  # after the values
        n_off = self.heads * self.points * 2
        with torch.no_grad():
            self.in_proj.weight[start:].zero_()  # offsets and logits start from their biases
            self.in_proj.bias[start:start + n_off].copy_(
                ring_offsets(self.heads, self.points).flatten() * 0.5)
            self.in_proj.bias[start + n_off:].zero_()
        nn.init.zeros_(self.log_temp)

    def forward(self, xq: torch.Tensor, qpos: torch.Tensor, src: torch.Tensor,
                src_pos: torch.Tensor, table: torch.Tensor, grid_hw: tuple[int, int],
                spacing: float) -> torch.Tensor:
        """
        Args:
            xq: (B, Nq, C) normalised queries; qpos: (B, Nq, 2) their positions.
            src: (B, Nk, C) source tokens (clustered, padded); src_pos: (B, Nk, 2), FAR at padding.
            table: (B, gh*gw, K) nearest source slots of every grid cell (``cell_neighbours``).
            spacing: typical distance between source tokens (patch units).
        Returns:
            (B, Nq, C)
        """
        B, Nq, C = xq.shape
        H, Pt, Dh = self.heads, self.points, self.head_dim
        proj = self.in_proj(xq)
        if self.self_attention:
            if src is not xq:
                raise ValueError("a self-attention takes its queries as the source (src is xq)")
            # one split: its backward is one concatenation of the two gradients
            value, offlog = proj.split([C, proj.shape[-1] - C], dim=-1)
        else:
            value, offlog = self.value(src), proj
        # points, their cells' key slots, the point softmax and the interpolation weights
        # attn_p * softmax_k(-p d_pk): one Triton kernel each way on CUDA
        with record_function("decoder/weights"):
            sel, w = deformable_weights(offlog, qpos, self.log_temp, src_pos, table, grid_hw,
                                        spacing, H, Pt)  # (B, Nq, H, Pt, K) each
        # sum_p attn_p sum_k w_pk v[sel_pk] is one weighted gather over the Pt*K (point,
        # neighbour) pairs: no (B, Nq, H, Pt, Dh) per-point values, no batched 1 x Pt matmul
        # (which took 11 of 60 ms of an aff_small step at 512 px), float32 accumulation.
        K = sel.shape[-1]
        w = w.view(B, Nq, H, 1, Pt * K)
        table = value.view(B, src.shape[1], H, Dh)  # (B, Nk, H, Dh), a strided view if fused
        with record_function("decoder/interpolate"):
            out = gather_weighted(table, sel.view(B, Nq, H, 1, Pt * K), w)  # (B, Nq, H, 1, Dh)
        return self.proj(out.reshape(B, Nq, C))


class DecoderBlock(nn.Module):
    """Deformable self-attention, deformable cross-attention into one stage, FFN."""

    def __init__(self, dim: int, src_dim: int, heads: int, points: int, knn: int,
                 mlp_ratio: float, norm_backend: str = "auto") -> None:
        super().__init__()
        self.src_proj = Linear(src_dim, dim)
        self.norm1 = FusedLayerNorm(dim, backend=norm_backend)
        self.self_attn = DeformableAttention(dim, heads, points, knn, self_attention=True)
        self.norm2 = FusedLayerNorm(dim, backend=norm_backend)
        self.cross_attn = DeformableAttention(dim, heads, points, knn)
        self.norm3 = FusedLayerNorm(dim, backend=norm_backend)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    @property
    def input_norm(self) -> FusedLayerNorm:
        """The norm of the block's input (fused into the previous block's last residual step)."""
        return self.norm1

    def forward(self, x, qpos, qpos_far, table_self, spacing_self, src, src_pos, table, spacing,
                grid_hw, h=None, next_norm=None):
        """-> (block output, features right after the cross-attention) both (B, Nq, C).
        ``h``: ``norm1(x)`` when the caller has it. ``next_norm``: the next block's input norm,
        fused with the last residual step; the block then returns (output, next_norm(output),
        cross) (see ``affmae.layers.common.run_chained``)."""
        h = self.norm1(x) if h is None else h
        x, h = self.norm2.residual(
            x, self.self_attn(h, qpos, h, qpos_far, table_self, grid_hw, spacing_self))
        cross, h = self.norm3.residual(
            x, self.cross_attn(h, qpos, src, src_pos, table, grid_hw, spacing))
        if next_norm is not None:
            return *next_norm.residual(cross, self.mlp(h)), cross
        return cross + self.mlp(h), cross


def far_padding(pos: torch.Tensor, n_valid: int, n_total: int | None = None) -> torch.Tensor:
    """Positions with padding slots (>= n_valid) moved FAR away, so no search selects them.

    ``pos`` (B, N, 2); with ``n_total`` it holds the n_valid real positions only and is padded
    to n_total slots. A fill and a copy (positions take no gradient)."""
    B, N, _ = pos.shape
    n_total = N if n_total is None else n_total
    if n_valid == n_total == N:
        return pos
    out = pos.new_full((B, n_total, pos.shape[2]), FAR)
    out[:, :n_valid] = pos[:, :n_valid]
    return out


class PointDecoder(nn.Module):
    """Coarse-to-fine decoder over the encoder's stage outputs, queried at patch positions."""

    def __init__(self, stage_dims: tuple[int, ...], dim: int = 384, heads: int = 6,
                 points: int = 4, knn: int = 4, mlp_ratio: float = 4.0, blocks_per_stage: int = 1,
                 cluster_size: int = 8, nbr_clusters: int = 8,
                 grad_checkpoint: bool = False, norm_backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.knn = dim, knn
        self.grad_checkpoint = grad_checkpoint  # recompute each block's activations in backward
        self.cluster_size, self.nbr_clusters = cluster_size, nbr_clusters
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        # blocks[i] serves stage (S - 1 - i): coarse to fine.
        self.blocks = nn.ModuleList(
            nn.ModuleList(DecoderBlock(dim, sd, heads, points, knn, mlp_ratio, norm_backend)
                          for _ in range(blocks_per_stage))
            for sd in reversed(stage_dims)
        )

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.query_token, std=0.02)
        for mod in self.modules():
            if isinstance(mod, DeformableAttention):
                mod.reset_parameters()

    def forward(self, stages, qpos: torch.Tensor, grid_hw: tuple[int, int],
                query_init: torch.Tensor | None = None, after: str = "block") -> list[torch.Tensor]:
        """
        Args:
            stages: encoder TokenSets, stage 1 first.
            qpos: (B, Nq, 2) query positions. grid_hw: (gh, gw).
            query_init: optional (B, Nq, C) features added to the learned query token (in
                ``qpos`` order); dense prediction passes each patch's own stage-1 token here.
            after: "block" (each stage's output) or "cross" (right after the cross-attention
                of the stage's last block, before its FFN: the paper's Fig. 4 features).
        Returns:
            Decoder features after each stage's blocks, coarse to fine: list of (B, Nq, C) in
            the order of ``qpos``.
        """
        if after not in ("block", "cross"):
            raise ValueError(f"after must be 'block' or 'cross', got {after!r}")
        B, Nq, _ = qpos.shape
        cells = grid_hw[0] * grid_hw[1]
        with record_function("decoder/cluster"):
            qcl = balanced_clustering(qpos, grid_hw, self.cluster_size, self.nbr_clusters)
            qpos_c = pad_tokens(gather_tokens(qpos, qcl.perm), qcl.n_padded)  # (B, Mq*m, 2)
            qpos_far = far_padding(qpos_c, Nq)
            table_self = cell_neighbours(qcl, qpos_far, grid_hw, self.knn, self.nbr_clusters)
        spacing_self = math.sqrt(cells / Nq)
        x = self.query_token + sincos_embed_2d(qpos_c, self.dim).to(self.query_token.dtype)
        if query_init is not None:
            x = x + pad_tokens(gather_tokens(query_init, qcl.perm), qcl.n_padded)
        inverse = qcl.inverse()  # (B, Nq) clustered slot of each query
        outs = []
        # each block's last residual step is fused with the next block's input norm (h), as in
        # ``run_chained``; the blocks of all stages form one chain
        flat = [blk for blocks in self.blocks for blk in blocks]
        next_norms = iter([blk.input_norm for blk in flat[1:]] + [None])
        h = None
        for blocks, st in zip(self.blocks, reversed(stages)):
            cl: Clustering = st.clustering
            with record_function("decoder/cluster"):
                spos = far_padding(st.pos, cl.n_valid, cl.n_padded)
                table = cell_neighbours(cl, spos, grid_hw, self.knn, self.nbr_clusters)
            spacing = math.sqrt(cells / cl.n_valid)
            for blk in blocks:
                src = blk.src_proj(st.x) + sincos_embed_2d(st.pos, self.dim).to(st.x.dtype)
                src = pad_tokens(src, cl.n_padded)
                nxt = next(next_norms)
                out = run_block(blk, self.grad_checkpoint, x, qpos_c, qpos_far, table_self,
                                spacing_self, src, spos, table, spacing, grid_hw, h=h,
                                next_norm=nxt)
                x, h, cross = out if nxt is not None else (out[0], None, out[1])
            # qpos order; qcl.perm inverts ``inverse`` (a gather backward, no atomics)
            outs.append(gather_tokens(cross if after == "cross" else x, inverse, qcl.perm))
        return outs
