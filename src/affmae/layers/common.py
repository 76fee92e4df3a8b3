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
    adds the branch to the residual stream in one ``addcmul``, in the stream's precision (an
    AFF block's stochastic depth was five to six small kernels per branch and step).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p
        # 1 / (1 - p) rounded as float32 arithmetic rounds it (the factor of a kept sample)
        self._scale = float(torch.tensor(1.0) / torch.tensor(1.0 - p))

    def factors(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factors (B,) float32: 0 or 1 / (1 - p); None when inactive (p = 0 or
        evaluation). ``forward`` and ``residual_add`` apply the same draw."""
        if self.p == 0.0 or not self.training:
            return None
        u = torch.rand(x.shape[0], device=x.device)
        return torch.where(u >= self.p, self._scale, 0.0)

    def _shaped(self, f: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return f.view((-1,) + (1,) * (x.dim() - 1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors(x)
        return x if f is None else x * self._shaped(f, x, x.dtype)

    def residual_add(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``x + self(branch)``: one kernel, the factor applied in the promoted dtype of x and
        the branch (float32 for an autocast model's float32 residual stream)."""
        f = self.factors(branch)
        if f is None:
            return x + branch
        dtype = torch.promote_types(x.dtype, branch.dtype)
        return torch.addcmul(x, branch, self._shaped(f, branch, dtype))

    def extra_repr(self) -> str:
        return f"p={self.p}"


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


def run_block(block: nn.Module, checkpointed: bool, *args):
    """``block(*args)``, or the same through ``torch.utils.checkpoint`` (non-reentrant, RNG state
    preserved so drop-path draws the same in the recomputation) when training with gradients."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)
