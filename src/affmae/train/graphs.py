"""CUDA-graph capture of a training loss: forward and backward replayed without Python.

An AFF step is many small kernels (clusterings, merges, neighbour tables, sixteen blocks, eight
deformable attentions); in eager mode the host's launch path, not the GPU, sets the pace
(docs/BENCHMARKS.md: 155 ms eager vs 36 ms replayed for aff_small pretraining at 512 px, batch
16, on an H200). ``GraphedLoss`` captures a job's forward with its loss, ``fn(model, *inputs)``
(pretraining: ``model(imgs, mask, num_masked=n)``; fine-tuning: the segmenter and its BCE/focal +
Dice loss), once with ``torch.cuda.make_graphed_callables`` (PyTorch's partial-network capture:
the forward and the backward each become one graph inside one autograd node) and replays it
every micro-step; the optimizer step, clipping, the loss scaler, augmentation and logging stay
eager and unchanged.

Requirements, all true for pretraining and fine-tuning at a fixed size: static shapes (batch,
resolution, masked count), no host synchronisation in forward or backward (the masked count is
passed in, never read back), autocast without its weight cache (the loop turns the cache off for
graphed jobs). DDP's gradient hooks are not captured: under torchrun the graph is off unless
``--cuda-graph`` asks for it, and then the loop replaces DDP by one bucketed ``all_reduce`` of
the gradients per optimizer step (``grad_sync="allreduce"``, tested with gloo on CPU; the
graphed multi-GPU run itself has not been run yet). Random ops (drop-path, the
pred_ratio subset) replay with fresh random numbers: PyTorch advances the CUDA generator's
offset on every replay.

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

import inspect
import sys
from typing import Callable

import torch
from torch import nn


def capture_mode_kwargs() -> dict:
    """``capture_error_mode="thread_local"`` where ``make_graphed_callables`` takes it
    (pytorch/pytorch#188832; torch 2.11 does not): only the capturing thread's own CUDA calls
    may then break a capture, not another thread's (a loader's pin-memory thread). On older
    versions the training loop keeps other threads off CUDA while it captures instead
    (``loop._pin_in_loader``)."""
    params = inspect.signature(torch.cuda.make_graphed_callables).parameters
    return {"capture_error_mode": "thread_local"} if "capture_error_mode" in params else {}


def cuda_graph_why_not(cfg, ctx, ranks_ok: bool = True) -> str | None:
    """Why a training run (``TrainConfig`` ``cfg`` on ``DistContext`` ``ctx``) cannot replay its
    micro-steps as a CUDA graph, or None when it can. When ``cfg.cuda_graph`` is unset (the
    default) only the measured setting turns it on: one CUDA process in bf16 or fp32.
    ``ranks_ok=False``: the job's loss talks to other ranks (fine-tuning's global Dice sums), so
    it cannot be captured under torchrun at all."""
    if ctx.device.type != "cuda":
        return f"needs a CUDA device, this run uses {ctx.device}"
    if ctx.world_size > 1 and not ranks_ok:
        return ("runs in one process only for this job: its loss all-reduces over the ranks "
                f"inside the forward, which a graph would capture ({ctx.world_size} ranks here)")
    if ctx.world_size > 1 and not cfg.cuda_graph:
        return (f"stays off by default under torchrun ({ctx.world_size} ranks here; not yet run on "
                "several GPUs); --cuda-graph turns it on, with the gradients averaged by one "
                "all_reduce per step instead of DDP, whose hooks a graph does not capture")
    if cfg.cuda_graph is None and cfg.precision == "fp16":
        return "is on by default for bf16 and fp32 only (fp16's loss scaler is not measured with it)"
    return None


def setup_cuda_graph(job, fn: Callable[..., dict], ranks_ok: bool = True) -> "GraphedLoss | None":
    """The ``GraphedLoss`` of ``job.model`` and ``fn`` when ``job.cfg.cuda_graph`` and the run
    allow it (``cuda_graph_why_not``), else None. An explicit ``cuda_graph=True`` that cannot
    run is an error; an unset one that stays off says why on a GPU. A graphed job keeps
    autocast's weight cache off and its gradients allocated (see ``GraphedLoss``)."""
    cfg, ctx = job.cfg, job.ctx
    why_not = cuda_graph_why_not(cfg, ctx, ranks_ok)
    if cfg.cuda_graph and why_not:
        raise ValueError(f"--cuda-graph {why_not}")
    if cfg.cuda_graph is None and why_not and ctx.device.type == "cuda" and ctx.is_main:
        print(f"[affmae] CUDA graph off: it {why_not}", file=sys.stderr)
    if cfg.cuda_graph is False or why_not:
        return None
    job.autocast_cache = False  # make_graphed_callables needs autocast's cache off
    job.grads_to_none = False  # the graph's gradient buffers must be added into, not adopted
    return GraphedLoss(job.model, fn)


def mae_loss(num_masked: int) -> Callable[..., dict]:
    """The pretraining loss ``fn(model, imgs, mask)`` (the masked count known: no sync)."""
    return lambda model, imgs, mask: model(imgs, mask, num_masked=num_masked)


class _Losses(nn.Module):
    """``fn(model, *inputs)``'s 0-dim ``loss*`` outputs as a tuple (what a graphed callable may
    return)."""

    def __init__(self, model: nn.Module, fn: Callable[..., dict]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn
        self.keys: list[str] | None = None

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.fn(self.model, *inputs)
        if self.keys is None:  # set by the first (warm-up) call
            self.keys = [k for k, v in out.items() if k.startswith("loss") and v.ndim == 0]
        return tuple(out[k] for k in self.keys)


class GraphedLoss:
    """``loss = GraphedLoss(model, fn)(*inputs)`` -> {"loss": ..., "loss_*": ...}, the 0-dim
    ``loss*`` entries of ``fn(model, *inputs)``; captured on the first call (under the
    caller's autocast), replayed after. ``fn`` is the whole forward with its loss, e.g.
    ``mae_loss(n)`` for pretraining. Inputs must keep their shapes, dtypes and device; they are
    copied into the graph's static inputs."""

    def __init__(self, model: nn.Module, fn: Callable[..., dict]) -> None:
        self.losses = _Losses(model, fn)
        self.fn = None
        self.shapes: tuple | None = None

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        shapes = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if self.fn is None:
            self._capture(inputs)
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError(f"a CUDA-graphed loss was captured for inputs {self.shapes} and "
                             f"now gets {shapes}; shapes must stay fixed (same batch and size)")
        return dict(zip(self.losses.keys, self.fn(*inputs)))

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        dev = inputs[0].device
        if any(t.device.type != "cuda" for t in inputs):
            raise ValueError(f"CUDA-graph capture needs CUDA tensors, got "
                             f"{[str(t.device) for t in inputs]}")
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
        cuda_rng = torch.cuda.get_rng_state(dev)
        self.fn = torch.cuda.make_graphed_callables(
            self.losses, tuple(inputs), num_warmup_iters=3, allow_unused_input=True,
            **capture_mode_kwargs())
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng, dev)
        for p in self.losses.parameters():  # own buffers, never the graph's (module docstring)
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
