"""Regional ``torch.compile``: compile every transformer block, leave the glue eager.

Whole-model compilation of AFFMAE is slow to build and brittle (data-dependent clustering,
host-side curve tables, one graph per token count). The blocks are where the many small
element-wise kernels are (LayerNorm, residuals, GELU, the decoder's interpolation weights), and
they are regular: one graph per stage and resolution. ``compile_blocks`` compiles exactly those,
for both model families alike (AFF encoder blocks, AFFMAE decoder blocks, ViT blocks, CrossMAE
blocks); the custom ops (cluster attention, point gather) stay single nodes of the graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from affmae.layers.block import AFFBlock
from affmae.layers.decoder import DecoderBlock
from affmae.models.vit import Block, CrossBlock

BLOCK_TYPES: tuple[type[nn.Module], ...] = (AFFBlock, DecoderBlock, Block, CrossBlock)
COMPILE_MODES = ("none", "blocks", "model")
#: graphs per block class: stages x resolutions x train/eval stay well below this.
_CACHE_LIMIT = 64


def compile_blocks(model: nn.Module, **kwargs) -> int:
    """Compile, in place, every transformer block of ``model``; returns how many.

    ``kwargs`` go to ``nn.Module.compile`` (default ``dynamic=False``: one static graph per
    shape, the form CUDA-graph capture and autotuning like best).
    """
    kwargs.setdefault("dynamic", False)
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), _CACHE_LIMIT))
    n = 0
    for mod in model.modules():
        if isinstance(mod, BLOCK_TYPES):
            mod.compile(**kwargs)
            n += 1
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no transformer block to compile "
                         f"(looked for {', '.join(t.__name__ for t in BLOCK_TYPES)})")
    return n


def apply_compile(model: nn.Module, mode: str) -> nn.Module:
    """``mode`` "none": the model; "blocks": ``compile_blocks`` in place, the model;
    "model": ``torch.compile(model, dynamic=False)`` (a wrapper)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "blocks":
        compile_blocks(model)
        return model
    if mode == "model":
        return torch.compile(model, dynamic=False)
    return model
