"""One full training step, its throughput and its peak memory (DESIGN 6).

A step is what pretraining does: forward with its loss under autocast, backward, gradient
clipping, AdamW step (weight decay groups as in training), zero_grad. Nothing is left out: the
optimiser step and its state count towards time and memory (the benchmark trap of DESIGN 7).

Timing: CUDA events around each step on a GPU (no host sync inside the step), wall clock
(``time.perf_counter``) on a CPU; the median over the timed steps. Warm-up steps run first, so
the optimiser state exists, cuDNN/Triton autotuning and ``torch.compile`` are done, before the
peak-memory counter is reset; the peak is ``torch.cuda.max_memory_allocated`` over the timed steps
(every one of them has the optimiser state). With ``cuda_graph`` the counter is reset before the
warm-up instead, since the graph's memory pool is allocated during capture (a peak over replays
alone would miss every activation). On a CPU memory is not measured (None).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from affmae.devices import backward_on_calling_thread

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def make_optimizer(model: torch.nn.Module, lr: float = 1.0e-4, weight_decay: float = 0.05,
                   capturable: bool = False) -> torch.optim.AdamW:
    """AdamW with the pretraining recipe's betas; no decay on ndim <= 1 parameters and on the
    model's ``no_weight_decay()`` names (DESIGN 5). On CUDA it is the fused kernel, as in
    training (``affmae.train.optim``): the bench times the step that training runs."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=(0.883, 0.935), capturable=capturable,
                             fused=fused)


class Trainer:
    """Holds what a step needs; ``step()`` runs one full training step."""

    def __init__(self, model: torch.nn.Module, imgs: torch.Tensor, is_masked: torch.Tensor,
                 dtype: str = "bf16", clip: float = 5.0, compile: bool | str = False,
                 cuda_graph: bool = False) -> None:
        from affmae.models.compiled import apply_compile

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        # compile: False / "none", True / "model" (whole model), "blocks" (compile_blocks)
        mode = {False: "none", True: "model"}.get(compile, compile)
        if cuda_graph and (not imgs.is_cuda or dtype == "fp16" or mode == "model"):
            raise ValueError("cuda_graph needs CUDA inputs, bf16 or fp32 (no loss scaler) and "
                             f"no whole-model compile; got device {imgs.device}, dtype {dtype}, "
                             f"compile={mode}")
        self.model = model.train()
        self.fn = apply_compile(model, mode)
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_loss: torch.Tensor | None = None
        self.opt = make_optimizer(model, capturable=cuda_graph)
        # Known masked count: the model then never reads the mask back (no sync in the step).
        self.num_masked = int(is_masked[0].sum())
        self.imgs, self.is_masked = imgs, is_masked
        self.device_type = imgs.device.type
        self.amp_dtype = DTYPES[dtype]
        # fp16 needs loss scaling to be a real training step; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device_type) if dtype == "fp16" else None
        self.clip = clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self) -> torch.Tensor:
        """One step: eager, or a replay of the captured step when ``cuda_graph``."""
        if not self.cuda_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.static_loss

    def _capture(self) -> None:
        """Capture the whole step (forward, backward, clip, AdamW) in one CUDA graph.

        Shapes are static for a fixed batch, resolution and mask ratio, and the step has no host
        sync, so one graph replays it with no Python or launch overhead. Warm-up steps run on a
        side stream first (allocator, autotuning, optimiser state), as the PyTorch recipe for
        whole-network capture asks.
        """
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step()

    def _step(self) -> torch.Tensor:
        with record_function("step/forward"):
            with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss = self.fn(self.imgs, self.is_masked, num_masked=self.num_masked)["loss"]
        with record_function("step/backward"), backward_on_calling_thread():  # as the trainer
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        with record_function("step/optimizer"):
            if self.scaler:
                self.scaler.unscale_(self.opt)
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            if self.scaler:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()


@dataclass
class StepStats:
    """Timed training steps of one model at one batch/resolution."""

    step_ms: list[float]  # duration of each timed step
    peak_mem_bytes: int | None  # max_memory_allocated over the timed steps (None on CPU)
    timer: str  # "cuda events" or "wall clock"
    final_loss: float  # loss of the last step (must be finite)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    def images_per_s(self, batch: int) -> float:
        return batch / (self.median_ms / 1000.0)


def measure_steps(trainer: Trainer, steps: int = 20, warmup: int = 5) -> StepStats:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones (see module docstring)."""
    if steps < 1 or warmup < 1:
        # at least one warm-up step: the optimiser state must exist before memory is measured
        raise ValueError(f"need steps >= 1 and warmup >= 1, got steps={steps}, warmup={warmup}")
    cuda = trainer.imgs.is_cuda
    if cuda and trainer.cuda_graph:
        # The graph's memory pool is allocated while capturing (in the warm-up): count it.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        trainer.step()
    times: list[float] = []
    if cuda:
        torch.cuda.synchronize()
        if not trainer.cuda_graph:
            torch.cuda.reset_peak_memory_stats()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for start, end in events:
            start.record()
            loss = trainer.step()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated()
        timer = "cuda events"
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = trainer.step()
            times.append((time.perf_counter() - t0) * 1000.0)
        peak = None
        timer = "wall clock"
    return StepStats(step_ms=times, peak_mem_bytes=peak, timer=timer, final_loss=float(loss))
