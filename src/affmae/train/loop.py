"""The training loop, written once for every job (pretraining now, fine-tuning later).

A job (``TrainJob`` subclass) supplies the model, the dataset and the per-micro-batch loss; the
loop owns everything else, in this order per optimizer step:

1. lr for this step from the schedule (a pure function of the step), times each group's lr_scale;
2. ``grad_accum`` micro-steps: forward under autocast (bf16/fp16), backward of loss/grad_accum
   (scaled for fp16; run on the calling thread, ``affmae.devices.backward_on_calling_thread``),
   DDP gradient sync only on the last micro-step (``no_sync`` before), or with
   ``grad_sync="allreduce"`` (and always for a CUDA-graphed loss) one bucketed ``all_reduce`` of
   every gradient after the last micro-step;
3. unscale (fp16), clip the global grad norm, optimizer step, scaler update;
4. losses averaged over micro-steps and ranks; a non-finite loss (or, outside fp16 where the
   scaler skips such steps, a non-finite grad norm) stops the run with an error naming the step;
5. rank 0: progress bar, CSV row every ``log_every``, figure every ``figure_every``;
6. checkpoint every ``ckpt_every`` (and at the end), atomically; ``model.safetensors`` at the end.

Determinism (exact resume): every random choice derives from ``cfg.seed``. Data order: epoch e's
permutation comes from ``torch.Generator().manual_seed(seed + e)``; optimizer step s of the
epoch, micro-step j, reads positions ``[(s * grad_accum + j) * batch_size, ...)`` of it and
rank r takes its contiguous ``batch_size / world_size`` slice. A resumed run builds its loader
from the saved step (no batch is re-read or skipped), crops are seeded by the dataset, masks by
``derive_seed(seed, step, micro)``, and the global RNG (dropout, drop-path) state of every rank
is checkpointed. The global batch of a micro-step is the same for any world size, so 1-GPU and
N-GPU runs at equal global batch see the same images with the same masks.

Throughput (``img_s``) counts images of all ranks per second of wall time of the whole step.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from affmae.devices import backward_on_calling_thread
from affmae.train.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from affmae.train.config import TrainConfig, save_yaml
from affmae.train.distributed import (DistContext, all_gather_objects, all_reduce_gradients,
                                      all_reduce_mean, barrier, broadcast_module)
from affmae.train.logger import CsvLogger
from affmae.train.optim import build_adamw, param_groups
from affmae.train.schedule import lr_at, set_lr

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Config fields that may change on resume without breaking the replay of the original run
# (output and bookkeeping only; anything else changed gets a warning naming it).
_RESUME_FREE = {"out", "resume", "log_every", "ckpt_every", "keep_every", "figure_every",
                "progress", "num_workers", "device", "ddp_find_unused", "deterministic",
                "cuda_graph", "grad_sync"}

# Model config fields that say how a model runs, not what it computes (same parameters, same
# function): a checkpoint resumes under any of their values (e.g. one written when the norms'
# default backend was "torch").
_MODEL_EXECUTION_FIELDS = {"attention_backend", "norm_backend", "grad_checkpoint"}


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TrainJob:
    """What a job gives the generic loop. Subclasses set ``cfg``, ``model``, ``dataset``.

    ``model`` is the unwrapped module (built with ``model_name`` / ``config`` per the registry
    contract); ``dataset`` items are collated with the default collate (tensors or tuples of
    tensors), and ``dataset.set_epoch(e)`` is called before each epoch if it exists.
    """

    name = "train"
    cfg: TrainConfig
    model: nn.Module
    dataset: Dataset
    #: evaluate every N steps (0 = never) and keep ``best.pt`` by this metric of ``evaluate``.
    eval_every: int = 0
    best_metric: str | None = None
    best_mode: str = "max"
    #: the job's ``GraphedLoss`` when it replays its loss as a CUDA graph (``setup_cuda_graph``)
    graphed: Any = None
    #: autocast's weight-cast cache (CUDA-graph capture needs it off)
    autocast_cache: bool = True
    #: ``zero_grad(set_to_none=...)``; a CUDA-graphed job keeps its gradients allocated (the
    #: graph's gradient outputs are static buffers that accumulation must add into, not adopt)
    grads_to_none: bool = True

    def loss(self, model: nn.Module, batch: Any, step: int, micro: int) -> dict[str, torch.Tensor]:
        """Forward one micro-batch (on the device, under autocast) -> {"loss", "loss_*"...}.

        ``model`` may be DDP-wrapped: call it, do not reach into it.
        """
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer groups; fine-tuning overrides this to add layer-wise lr scales."""
        return param_groups(self.model, self.cfg.weight_decay)

    def checkpoint_extra(self) -> dict[str, Any]:
        """Extra checkpoint entries (e.g. ``data_stats``); plain values and tensors only."""
        return {}

    def figure(self, model: nn.Module, path: Path, step: int) -> None:
        """Rank 0 only: save a figure (model unwrapped, eval mode, no grad, autocast)."""

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """All ranks (unwrapped model, eval mode, no grad, autocast): metrics for ``eval.csv``
        and ``best_metric``; must return the same values on every rank (reduce them)."""
        return {}


@dataclass
class TrainResult:
    """What ``fit`` returns: steps completed, this run's per-step losses, paths."""

    step: int
    losses: list[float] = field(default_factory=list)
    out: Path = Path(".")
    checkpoint: Path | None = None


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------

def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch (remainder dropped); errors when not even one fits."""
    effective = cfg.batch_size * cfg.grad_accum
    if n < effective:
        raise ValueError(f"the dataset has {n} images, fewer than one effective batch "
                         f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} = "
                         f"{effective}); lower --batch-size or --grad-accum")
    return n // effective


def batch_indices(n: int, cfg: TrainConfig, epoch: int, start: int, stop: int,
                  ctx: DistContext) -> list[list[int]]:
    """This rank's dataset indices for steps ``start..stop-1`` of ``epoch``, one list per
    micro-step (see the module docstring for the layout)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    per_rank = cfg.batch_size // ctx.world_size
    out = []
    for s in range(start, stop):
        for j in range(cfg.grad_accum):
            first = (s * cfg.grad_accum + j) * cfg.batch_size + ctx.rank * per_rank
            out.append(perm[first:first + per_rank])
    return out


def _epoch_batches(n: int, cfg: TrainConfig, start: int, total: int, spe: int,
                   ctx: DistContext):
    """Micro-batches of steps ``start..total-1`` across epochs, as ``(epoch, index)`` keys."""
    step = start
    while step < total:
        epoch, in_epoch = divmod(step, spe)
        stop = min(total, (epoch + 1) * spe)
        for batch in batch_indices(n, cfg, epoch, in_epoch, stop - epoch * spe, ctx):
            yield [(epoch, i) for i in batch]
        step = stop


def _loader(job: TrainJob, start: int, total: int, spe: int, ctx: DistContext) -> DataLoader:
    """One loader for the whole run: its workers start once, not at every epoch (with a small
    dataset an epoch is a few steps). The dataset takes ``(epoch, index)`` keys, so crops
    depend on the epoch without any per-epoch state in the workers."""
    cfg = job.cfg
    return DataLoader(
        job.dataset, batch_sampler=_epoch_batches(len(job.dataset), cfg, start, total, spe, ctx),
        num_workers=cfg.num_workers, pin_memory=_pin_in_loader(job, ctx),
        # An explicit generator: a loader must not draw its worker seeds from the global RNG,
        # whose stream drives drop-path and must not depend on when loaders are created.
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "loader", start)))


def _pin_in_loader(job: TrainJob, ctx: DistContext) -> bool:
    """Whether the loader's pin-memory thread pins the batches: on CUDA, unless the loss is a
    CUDA graph. Its capture runs in the default "global" mode, where a CUDA call from any other
    thread breaks it, and the pin-memory thread allocates pinned memory (``cudaHostAlloc``)
    whenever it stages the next batch: a capture racing with it fails with "operation failed
    due to a previous error during capture" (pytorch/pytorch#188832; the likely cause of that
    error in a crashed-and-resumed graphed run on the H200, session 9, not yet re-run). A graphed run pins in the main thread instead
    (``_to_device``), before the loss call, so no other thread touches CUDA while it captures."""
    return ctx.device.type == "cuda" and job.graphed is None


def _to_device(batch: Any, device: torch.device, pin: bool = False) -> Any:
    """``batch``'s tensors on ``device`` (asynchronous copies); ``pin``: page-lock them in this
    thread first (what the loader's pin-memory thread does otherwise)."""
    if isinstance(batch, torch.Tensor):
        if pin and device.type == "cuda" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, pin) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, pin) for k, v in batch.items()}
    return batch


# ----------------------------------------------------------------------------------------------
# Checkpoint / resume
# ----------------------------------------------------------------------------------------------

def resume_path(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: ``cfg.resume``, or OUT/latest.pt for 'auto' (if any)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        latest = Path(cfg.out) / "latest.pt"
        return latest if latest.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: no such checkpoint")
    return path


def _with_defaults(saved: dict, config: Any) -> dict:
    """``saved`` (a config dict from a checkpoint) with the fields it predates filled in with
    their defaults, in ``config_dict`` form: a field added by a later version, at its default,
    is no change."""
    import dataclasses

    out = dict(saved)
    for f in dataclasses.fields(config):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in out and not required:
            value = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                     else f.default)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _check_resume_config(ckpt: dict, cfg: TrainConfig, model: nn.Module, path: Path,
                         ctx: DistContext) -> None:
    from affmae.models.registry import config_dict

    saved = _with_defaults(ckpt["model_config"], model.config)
    now = config_dict(model)
    same = {k: v for k, v in saved.items() if k not in _MODEL_EXECUTION_FIELDS}
    if ckpt["model_name"] != model.model_name or same != {
            k: v for k, v in now.items() if k not in _MODEL_EXECUTION_FIELDS}:
        raise ValueError(f"{path} holds model {ckpt['model_name']!r} with config "
                         f"{ckpt['model_config']}, but this run builds {model.model_name!r} "
                         f"with {now}")
    old, new = _with_defaults(ckpt.get("config", {}), cfg), cfg.to_dict()
    changed = [f"{k} ({old.get(k)!r} -> {v!r})" for k, v in new.items()
               if k not in _RESUME_FREE and old.get(k) != v]
    if changed:
        _note(ctx, f"resuming {path} with changed settings: {', '.join(changed)}; the run will "
                   "not replay an uninterrupted one exactly")


def _note(ctx: DistContext, msg: str) -> None:
    if ctx.is_main:
        tqdm.write(f"[affmae] {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def fit(job: TrainJob, ctx: DistContext) -> TrainResult:
    """Train ``job`` to ``cfg.steps`` (or ``cfg.epochs``) optimizer steps; see module docstring."""
    cfg, out = job.cfg, Path(job.cfg.out)
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} (global) is not divisible by the world "
                         f"size {ctx.world_size}")
    spe = steps_per_epoch(len(job.dataset), cfg)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    if cfg.warmup_steps >= total:
        _note(ctx, f"warmup_steps {cfg.warmup_steps} >= total steps {total}: the lr never "
                   f"reaches {cfg.lr:g}")
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for repeatable results (read when its handle is made).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    model = job.model.to(ctx.device)
    optimizer = build_adamw(job.param_groups(), cfg.lr, cfg.betas, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")
    autocast = torch.autocast(ctx.device.type, dtype=AUTOCAST_DTYPES.get(cfg.precision),
                              enabled=cfg.precision != "fp32", cache_enabled=job.autocast_cache)

    # 1. Fresh start or resume (model, optimizer, scaler, step, RNG, elapsed time, best metric).
    start, elapsed, best = 0, 0.0, None
    ckpt_file = resume_path(cfg)
    if ckpt_file is not None:
        ckpt = load_checkpoint(ckpt_file, map_location=ctx.device)
        _check_resume_config(ckpt, cfg, model, ckpt_file, ctx)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if cfg.precision == "fp16" and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start, elapsed, best = ckpt["step"], ckpt.get("elapsed", 0.0), ckpt.get("best")
        if ckpt.get("world_size") == ctx.world_size:
            set_rng_state(ckpt["rng"][ctx.rank], ctx.device)
        else:
            torch.manual_seed(derive_seed(cfg.seed, "rng", start, ctx.rank))
            _note(ctx, f"{ckpt_file} was written by {ckpt.get('world_size')} rank(s), this run "
                       f"has {ctx.world_size}: drop-path RNG re-seeded (data order and masks "
                       "are unaffected)")
        _note(ctx, f"resumed from {ckpt_file} at step {start}")
        del ckpt
    else:
        torch.manual_seed(derive_seed(cfg.seed, "rng", 0, ctx.rank))
        if (out / "latest.pt").is_file():
            _note(ctx, f"{out / 'latest.pt'} exists and will be overwritten by this fresh run "
                       "(--resume auto continues it instead)")

    logger = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
        logger = CsvLogger(out / "log.csv", resume_step=start if ckpt_file else None)
        eval_logger = CsvLogger(out / "eval.csv", resume_step=start if ckpt_file else None)
    net = model
    # Gradient sync under torchrun: DDP, or one bucketed all_reduce after the last micro-step
    # (asked for, or forced by a CUDA-graphed loss: DDP's hooks are not captured).
    allreduce = ctx.distributed and (cfg.grad_sync == "allreduce" or job.graphed is not None)
    if allreduce:
        broadcast_module(model, ctx)  # what DDP does when it wraps the model
    elif ctx.distributed:
        net = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                  find_unused_parameters=cfg.ddp_find_unused)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    images_per_step = cfg.batch_size * cfg.grad_accum

    def save(path: Path, step: int) -> None:
        # All ranks: gather RNG states (a collective); rank 0 writes.
        rngs = all_gather_objects(rng_state(ctx.device), ctx)
        if not ctx.is_main:
            return
        from affmae.models.registry import config_dict

        atomic_save({
            "model_name": model.model_name, "model_config": config_dict(model),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "epoch": step // spe,
            "step_in_epoch": step % spe, "steps_per_epoch": spe, "total_steps": total,
            "rng": [{k: v.cpu() for k, v in r.items()} for r in rngs],
            "world_size": ctx.world_size, "config": cfg.to_dict(), "job": job.name,
            "elapsed": elapsed + time.perf_counter() - t_run, "best": best,
            "torch_version": str(torch.__version__), **job.checkpoint_extra(),
        }, path)

    bar = tqdm(total=total, initial=start, disable=not (ctx.is_main and cfg.progress),
               desc=job.name, dynamic_ncols=True, file=sys.stderr)
    losses: list[float] = []
    window: dict[str, float] = {}  # sums since the last log row
    window_steps, window_time = 0, 0.0
    t_run = time.perf_counter()
    last_ckpt = None
    model.train()
    step = start
    batches = iter(_loader(job, start, total, spe, ctx))
    pin_here = ctx.device.type == "cuda" and not _pin_in_loader(job, ctx)
    while step < total:
        epoch = step // spe
        stop = min(total, (epoch + 1) * spe)
        for step in range(step, stop):
            t0 = time.perf_counter()
            # 1. lr from the schedule, per group scale kept.
            lr = lr_at(step, base_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=total,
                       min_lr=cfg.min_lr)
            set_lr(optimizer, lr)
            # 2. Micro-steps with gradient accumulation.
            keys: list[str] = []
            sums: torch.Tensor | None = None
            for micro in range(cfg.grad_accum):
                batch = _to_device(next(batches), ctx.device, pin=pin_here)
                last = micro == cfg.grad_accum - 1
                sync = (contextlib.nullcontext() if last or net is model
                        else net.no_sync())
                with sync:
                    with autocast:
                        outputs = job.loss(net, batch, step, micro)
                    with backward_on_calling_thread():  # no handoff to autograd's worker thread
                        scaler.scale(outputs["loss"] / cfg.grad_accum).backward()
                if not keys:
                    keys = ["loss"] + sorted(k for k in outputs
                                             if k.startswith("loss_") and outputs[k].ndim == 0)
                vals = torch.stack([outputs[k].detach().float() for k in keys])
                sums = vals if sums is None else sums + vals
            # 3. (all_reduce sync), unscale, clip, step.
            if allreduce:
                all_reduce_gradients(params, ctx)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
            # 4. Losses over micro-steps and ranks; stop on non-finite values.
            stats = all_reduce_mean(torch.cat([sums / cfg.grad_accum, grad_norm.reshape(1)
                                               .float()]), ctx).tolist()
            values, gnorm = dict(zip(keys, stats[:-1])), stats[-1]
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"non-finite loss {values} at step {step} (epoch {epoch}); stopping. Last "
                    f"checkpoint: {last_ckpt or 'none'}. Try a lower --lr, a longer warmup or "
                    "--precision bf16")
            if not math.isfinite(gnorm) and cfg.precision != "fp16":
                raise FloatingPointError(
                    f"non-finite gradient norm at step {step} (epoch {epoch}, loss "
                    f"{values['loss']:.4g}); stopping. Last checkpoint: {last_ckpt or 'none'}")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=job.grads_to_none)
            done = step + 1
            dt = time.perf_counter() - t0
            losses.append(values["loss"])
            for k, v in values.items():
                window[k] = window.get(k, 0.0) + v
            window["grad_norm"] = window.get("grad_norm", 0.0) + gnorm
            window_steps, window_time = window_steps + 1, window_time + dt
            # 5. Progress bar, log row, evaluation, figure (rank 0 writes).
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{images_per_step / dt:.1f}", refresh=False)
            final = done == total
            if logger is not None and (done % cfg.log_every == 0 or final):
                row = {"step": done, "epoch": round(done / spe, 4)}
                row.update({k: window[k] / window_steps for k in keys})
                row.update({"lr": lr, "grad_norm": window["grad_norm"] / window_steps,
                            "img_s": images_per_step * window_steps / window_time,
                            "time": elapsed + time.perf_counter() - t_run})
                logger.log(row)
            if done % cfg.log_every == 0 or final:
                window, window_steps, window_time = {}, 0, 0.0
            if job.eval_every and (done % job.eval_every == 0 or final):
                model.eval()
                with torch.no_grad(), autocast:
                    metrics = job.evaluate(model, done)
                model.train()
                if ctx.is_main and metrics:
                    eval_logger.log({"step": done, **metrics})
                # Every rank decides (metrics are identical on all ranks), as saving is collective.
                if metrics and job.best_metric is not None:
                    value = metrics[job.best_metric]
                    if best is None or (value > best["value"] if job.best_mode == "max"
                                        else value < best["value"]):
                        best = {"metric": job.best_metric, "value": value, "step": done}
                        save(out / "best.pt", done)
            if ctx.is_main and cfg.figure_every and (final or done % cfg.figure_every == 0):
                model.eval()
                with torch.no_grad(), autocast:
                    job.figure(model, out / "figures" / f"step_{done:07d}.png", done)
                model.train()
            # 6. Checkpoints.
            if done % cfg.ckpt_every == 0 or final:
                save(out / "latest.pt", done)
                last_ckpt = out / "latest.pt"
            if cfg.keep_every and done % cfg.keep_every == 0:
                save(out / f"step_{done:07d}.pt", done)
        step = stop
    bar.close()
    if ctx.is_main:
        from affmae.models.registry import save_safetensors

        save_safetensors(model, out / "model.safetensors",
                         data_stats=job.checkpoint_extra().get("data_stats"))
    barrier(ctx)
    return TrainResult(step=max(step, start), losses=losses, out=out,
                       checkpoint=out / "latest.pt" if (out / "latest.pt").is_file() else None)
