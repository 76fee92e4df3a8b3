"""CUDA-graph capture of a training loss: forward and backward replayed without Python.

An AFF step is many small kernels (clusterings, merges, neighbour tables, sixteen blocks, eight
deformable attentions); in eager mode the host's launch path, not the GPU, sets the pace
(docs/BENCHMARKS.md: 109 ms eager vs 65 ms replayed for aff_small at 512 px, batch 16, on an
H100). ``GraphedLoss`` captures ``model(imgs, mask, num_masked=n)`` once with
``torch.cuda.make_graphed_callables`` (PyTorch's partial-network capture: the forward and the
backward each become one graph inside one autograd node) and replays it every micro-step; the
optimizer step, clipping, the loss scaler and logging stay eager and unchanged.

Requirements, all true for pretraining at a fixed size and mask ratio: static shapes (batch,
resolution, masked count), no host synchronisation in forward or backward (the masked count is
passed in, never read back), one process (DDP's gradient hooks are not captured; ``affmae
pretrain`` leaves the graph off under torchrun, and refuses an explicit ``--cuda-graph``), autocast without its weight cache (the loop turns the
cache off for graphed jobs). Random ops (drop-path, the pred_ratio subset) replay with fresh
random numbers: PyTorch advances the CUDA generator's offset on every replay.

Gradients: the graphed backward hands out its static gradient buffers, and autograd adopts an
incoming gradient as ``p.grad`` when ``p.grad`` is None; the next replay (the next micro-step of
a gradient accumulation) would then overwrite the accumulated gradient. So ``GraphedLoss`` gives
every trainable parameter a zero ``.grad`` at capture, and its users zero gradients in place
(``zero_grad(set_to_none=False)``): accumulation then always adds into the parameter's own
buffer.

The capture runs three warm-up iterations; the CPU and CUDA RNG states are restored after it, so
a run (and its resume, which captures again) draws the same numbers whether or not it captured.
"""

from __future__ import annotations

import torch
from torch import nn


class _Losses(nn.Module):
    """The model's 0-dim ``loss*`` outputs as a tuple (what a graphed callable may return)."""

    def __init__(self, model: nn.Module, num_masked: int) -> None:
        super().__init__()
        self.model = model
        self.num_masked = num_masked
        self.keys: list[str] | None = None

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(imgs, mask, num_masked=self.num_masked)
        if self.keys is None:  # set by the first (warm-up) call
            self.keys = [k for k, v in out.items() if k.startswith("loss") and v.ndim == 0]
        return tuple(out[k] for k in self.keys)


class GraphedLoss:
    """``loss = GraphedLoss(model, n)(imgs, mask)`` -> {"loss": ..., "loss_*": ...}; captured on
    the first call (under the caller's autocast), replayed after. Inputs must keep their shape,
    dtype and device; they are copied into the graph's static inputs."""

    def __init__(self, model: nn.Module, num_masked: int) -> None:
        self.losses = _Losses(model, num_masked)
        self.fn = None
        self.shapes: tuple | None = None

    def __call__(self, imgs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        shapes = (tuple(imgs.shape), imgs.dtype, tuple(mask.shape), mask.dtype, imgs.device)
        if self.fn is None:
            self._capture(imgs, mask)
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError(f"a CUDA-graphed loss was captured for inputs {self.shapes} and "
                             f"now gets {shapes}; shapes must stay fixed (same batch and size)")
        return dict(zip(self.losses.keys, self.fn(imgs, mask)))

    def _capture(self, imgs: torch.Tensor, mask: torch.Tensor) -> None:
        if imgs.device.type != "cuda":
            raise ValueError(f"CUDA-graph capture needs CUDA tensors, got {imgs.device}")
        if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
            raise RuntimeError("CUDA-graph capture needs autocast with cache_enabled=False")
        # make_graphed_callables keeps the captured forward's outputs alive, and with them the
        # parameters' AccumulateGrad nodes, created on its capture stream: every replayed
        # backward accumulates there after a cross-stream wait, and PyTorch (>= 2.10) warns
        # that the streams differ. The result is correct (the engine syncs; the loss curves
        # match eager, docs/BENCHMARKS.md); what the wait costs is bounded by the loop's 377
        # img/s against the whole-step bench's 446 at 512 px. The warning would otherwise
        # greet every default run on a GPU, so it is turned off here (process-wide), before
        # the capture: a run on the H200 showed it already during capture.
        quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if quiet is not None:
            quiet(False)
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(imgs.device)
        self.fn = torch.cuda.make_graphed_callables(
            self.losses, (imgs, mask), num_warmup_iters=3, allow_unused_input=True)
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng, imgs.device)
        for p in self.losses.parameters():  # own buffers, never the graph's (module docstring)
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
