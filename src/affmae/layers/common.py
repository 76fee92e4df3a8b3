"""Small shared modules: MLP, stochastic depth, 2-D sine-cosine position embedding."""

from __future__ import annotations

import functools
import math

import torch
import torch.utils.checkpoint
from torch import nn

from affmae.ops.linear import Linear


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p`` in training.

    A kept sample's branch is scaled by 1 / (1 - p) (float32). The per-sample factors come
    from one uniform draw and one ``where`` (``factors``); ``residual_add`` applies them and
    adds the branch to the residual stream in one ``addcmul``, in the stream's precision.

    The encoders draw every block's factors at once (``StochasticDepth``: three kernels a
    forward instead of two per branch) and pass each block its rows as ``given``; a DropPath
    called without them draws its own.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p
        # 1 / (1 - p) rounded as float32 arithmetic rounds it (the factor of a kept sample)
        self._scale = float(torch.tensor(1.0) / torch.tensor(1.0 - p))

    def factors(self, x: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per-sample factors (B,) float32: 0 or 1 / (1 - p); None when inactive (p = 0 or
        evaluation). ``given``: factors drawn by the caller for this branch, used as they are.
        ``forward`` and ``residual_add`` apply the same draw."""
        if self.p == 0.0 or not self.training:
            return None
        if given is not None:
            return given
        u = torch.rand(x.shape[0], device=x.device)
        return torch.where(u >= self.p, self._scale, 0.0)

    def _shaped(self, f: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return f.view((-1,) + (1,) * (x.dim() - 1)).to(dtype)

    def forward(self, x: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        f = self.factors(x, given)
        return x if f is None else x * self._shaped(f, x, x.dtype)

    def residual_add(self, x: torch.Tensor, branch: torch.Tensor,
                     given: torch.Tensor | None = None) -> torch.Tensor:
        """``x + self(branch)``: one kernel, the factor applied in the promoted dtype of x and
        the branch (float32 for an autocast model's float32 residual stream)."""
        f = self.factors(branch, given)
        if f is None:
            return x + branch
        dtype = torch.promote_types(x.dtype, branch.dtype)
        return torch.addcmul(x, branch, self._shaped(f, branch, dtype))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class StochasticDepth(nn.Module):
    """The drop-path factors of a stack of blocks, drawn in one go.

    ``draw(batch, device)`` -> (blocks, branches, batch) float32 factors, or None when no block
    drops (evaluation, or every rate 0): row [i, j] is what block i's ``DropPath`` with rate
    ``rates[i]`` would draw for its j-th branch. One uniform draw, one comparison and one
    ``where`` for the whole stack, where each branch drew for itself before (two kernels per
    branch: 56 per aff_small step).

    The rates and factors go to each device once and are kept here, not as buffers: buffers
    would be in every DDP broadcast. A draw during CUDA-graph capture on a device without them
    (a host-to-device copy is not capturable) returns None, and the blocks draw for themselves.
    """

    def __init__(self, rates: list[float], branches: int = 2) -> None:
        super().__init__()
        self.branches = branches
        self.rates = [float(r) for r in rates]
        self.active = any(r > 0 for r in self.rates)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        t = self._on.get(device)
        if t is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            scales = [DropPath(r)._scale for r in self.rates]
            t = self._on[device] = (torch.tensor(self.rates, dtype=torch.float32, device=device),
                                    torch.tensor(scales, dtype=torch.float32, device=device))
        return t

    def draw(self, batch: int, device: torch.device) -> torch.Tensor | None:
        if not (self.training and self.active):
            return None
        tables = self._tables(torch.device(device))
        if tables is None:
            return None
        rates, scales = tables
        u = torch.rand(len(self.rates), self.branches, batch, device=device)
        return torch.where(u >= rates[:, None, None], scales[:, None, None], 0.0)

    def extra_repr(self) -> str:
        return f"blocks={len(self.rates)}, branches={self.branches}"


def sincos_embed_2d(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding of continuous positions.

    Args:
        pos: (..., 2) float (x, y) in patch units.
        dim: embedding width, a multiple of 4 (a quarter each for sin x, cos x, sin y, cos y).
    Returns:
        (..., dim) float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"sine-cosine embedding width must be a multiple of 4, got {dim}")
    omega = _sincos_freqs(dim // 4, float(temperature), str(pos.device))  # (quarter,)
    ang = pos.float()[..., :, None] * omega  # (..., 2, quarter): x's angles, then y's
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)  # sin x, cos x, sin y, cos y


@functools.lru_cache(maxsize=64)
def _sincos_freqs(quarter: int, temperature: float, device: str) -> torch.Tensor:
    """1 / temperature^(i / quarter), i < quarter, float32: a pure function of the width,
    computed on the CPU and copied once per device (four kernels per embedding before)."""
    omega = torch.arange(quarter, dtype=torch.float32) / quarter
    return (1.0 / (temperature**omega)).to(device)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) Linear weights, zero biases, unit LayerNorms (ViT/MAE recipe)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def ring_offsets(heads: int, points: int) -> torch.Tensor:
    """(heads, points, 2) initial sampling offsets: head h looks along angle 2*pi*h/heads,
    point p at distance p + 1 (Deformable DETR's initialisation)."""
    theta = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    direction = torch.stack([theta.cos(), theta.sin()], dim=-1)  # (heads, 2)
    scale = torch.arange(1, points + 1, dtype=torch.float32).view(1, points, 1)
    return direction[:, None, :] * scale  # (heads, points, 2)


GRAD_CHECKPOINT = ("none", "encoder", "decoder", "all")  # values of the models' grad_checkpoint


def check_grad_checkpoint(mode: str) -> None:
    """A model config's ``grad_checkpoint`` must be one of GRAD_CHECKPOINT."""
    if mode not in GRAD_CHECKPOINT:
        raise ValueError(f"grad_checkpoint must be one of {'|'.join(GRAD_CHECKPOINT)}, got "
                         f"{mode!r}")


def checkpoints(mode: str, part: str) -> bool:
    """Whether ``grad_checkpoint=mode`` recomputes the blocks of ``part`` ("encoder"|"decoder")."""
    return mode in (part, "all")


def run_block(block: nn.Module, checkpointed: bool, *args, **kwargs):
    """``block(*args, **kwargs)``, or the same through ``torch.utils.checkpoint`` (non-reentrant,
    RNG state preserved so drop-path draws the same in the recomputation) when training with
    gradients."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


def run_chained(blocks, checkpointed: bool, x: torch.Tensor, *args, per_block=None,
                each=None) -> torch.Tensor:
    """Run pre-norm blocks in order (``run_block`` each) and return the last output.

    Block i's last residual step is fused with block i+1's input norm: block i gets
    ``next_norm=blocks[i + 1].input_norm`` and returns ``(x, next_norm(x))`` from one
    ``FusedLayerNorm.residual``; block i+1 gets that norm as ``h``. Without the fusion the
    residual stream x feeds two ops, its input norm and its next residual add, and autograd
    sums their two gradients in a separate add over (B, N, C), one per block. Fused, the
    residual step's backward takes the other gradient as its ``ds`` inside the norm's kernel
    (and the forward saves a separate norm kernel). Same function: on the PyTorch path
    ``residual`` is the plain add and norm, the same ops; where the stream has a third consumer
    (the decoder's per-stage outputs) autograd may sum its gradients in another order (last
    bits in float32; within 3e-15 in float64).

    Blocks take ``(x, *args, [per_block[i]], h=..., next_norm=...)`` and have ``input_norm``.
    ``per_block``: an optional sequence of one extra positional argument per block.
    ``each``: optional ``each(i, x)`` called with every block's output.
    """
    h = None
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1].input_norm if i + 1 < len(blocks) else None
        extra = () if per_block is None else (per_block[i],)
        out = run_block(blk, checkpointed, x, *args, *extra, h=h, next_norm=nxt)
        x, h = out if nxt is not None else (out, None)
        if each is not None:
            each(i, x)
    return x
