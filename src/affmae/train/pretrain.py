"""``affmae pretrain``: AFFMAE pretraining on a folder of unlabelled images (paper sec. 4; DESIGN 2, 5).

    affmae pretrain --data DIR [--config run.yaml] [--size 512] [--model aff_small] ...

Set-up, all before the first step (so every bad input fails at once, naming the problem):
1. the model from the registry (overrides validated by its config);
2. the image folder (every file opened; mean/std computed once, or taken from the checkpoint
   being resumed so normalisation never changes mid-run), size checked against the patch;
3. the distributed process group (torchrun) and the generic loop of ``loop.py``.

Masks: one ``make_mask`` call per micro-step for the GLOBAL micro-batch, seeded by
(seed, step, micro-step), of which each rank takes its slice. The brief suggested a seed per
rank; drawing the global batch instead makes a 1-GPU and an N-GPU run at equal global batch use
identical masks (and identical images), so their loss curves differ only by reduction order and
drop-path draws. The cost is a CPU noise field for the global batch on every rank (small).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from affmae.train.config import PretrainConfig, add_config_arguments, config_from_args
from affmae.train.distributed import (DistContext, context_from_env, destroy_process_group,
                                      init_process_group)
from affmae.train.figures import save_reconstruction_figure
from affmae.train.graphs import mae_loss, setup_cuda_graph
from affmae.train.loop import TrainJob, TrainResult, derive_seed, fit, resume_path

FIGURE_IMAGES = 4  # rows of the reconstruction figure


class PretrainJob(TrainJob):
    """MAE pretraining: images in, masked-patch reconstruction loss out."""

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, ctx: DistContext) -> None:
        from affmae import create_model
        from affmae.data.datasets import ImageFolder

        self.cfg, self.ctx = cfg, ctx
        # 1. Model (same seed on every rank: identical init before DDP's broadcast anyway).
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.model, **cfg.model_overrides)
        self.patch = int(self.model.patch_size)
        h, w = cfg.size
        if h % self.patch or w % self.patch:
            raise ValueError(f"size {cfg.size} (H, W) is not a multiple of the patch size "
                             f"{self.patch} of model {cfg.model!r}")
        self.grid = (h // self.patch, w // self.patch)
        from affmae.ops.masking import num_masked

        self.n_masked = num_masked(self.grid[0] * self.grid[1], cfg.mask_ratio)
        self.loss_fn = mae_loss(self.n_masked)
        self.graphed = setup_cuda_graph(self, self.loss_fn)
        # 2. Data; a resumed run keeps the statistics it was trained with.
        stats = _resumed_stats(cfg)
        self.dataset = ImageFolder(cfg.data, cfg.size, patch_size=self.patch, mode=cfg.crop,
                                   mean=stats.get("mean"), std=stats.get("std"),
                                   skip_bad=cfg.skip_bad, seed=cfg.seed)
        self.data_stats = {"mean": float(self.dataset.mean), "std": float(self.dataset.std)}
        labels = [p for p, _ in self.dataset.items
                  if {"masks", "labels"} & {d.lower() for d in p.parent.parts}]
        if labels and ctx.is_main:
            print(f"[affmae] warning: {len(labels)} of the training images lie under a folder "
                  f"named masks/labels (e.g. {labels[0]}); pass the images folder as --data "
                  "if those are label masks", file=sys.stderr)
        # Fixed figure inputs: the first images (epoch 0 crops) with one fixed mask.
        self.dataset.set_epoch(0)
        n_fig = min(FIGURE_IMAGES, len(self.dataset))
        self.fig_images = torch.stack([self.dataset[i] for i in range(n_fig)])  # (n, 1, H, W)
        self.fig_mask = self._mask(n_fig, derive_seed(cfg.seed, "figure"))

    def _mask(self, batch: int, seed: int) -> torch.Tensor:
        from affmae.ops.masking import make_mask

        gen = torch.Generator().manual_seed(seed)
        return make_mask(batch, self.grid, self.cfg.mask_ratio, self.cfg.mask_kind,
                         self.cfg.perlin_scales, generator=gen, device="cpu")  # (B, gh*gw)

    def loss(self, model: nn.Module, batch: torch.Tensor, step: int,
             micro: int) -> dict[str, torch.Tensor]:
        per_rank = batch.shape[0]
        mask = self._mask(self.cfg.batch_size, derive_seed(self.cfg.seed, "mask", step, micro))
        mask = mask[self.ctx.rank * per_rank:(self.ctx.rank + 1) * per_rank]  # this rank's rows
        # The masked count is known from the ratio: the model need not read the mask back
        # (one device sync per micro-step fewer).
        mask = mask.to(batch.device, non_blocking=True)
        if self.graphed is not None:  # the loop never wraps a graphed job's model in DDP
            return self.graphed(batch, mask)
        return self.loss_fn(model, batch, mask)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"data_stats": dict(self.data_stats)}

    def figure(self, model: nn.Module, path: Path, step: int) -> None:
        imgs = self.fig_images.to(self.ctx.device)
        mask = self.fig_mask.to(self.ctx.device)
        recon = model.reconstruct(imgs, mask)
        save_reconstruction_figure(path, imgs, mask, recon, self.patch, self.data_stats["mean"],
                                   self.data_stats["std"], title=f"{self.cfg.model}, step {step}")


def _resumed_stats(cfg: PretrainConfig) -> dict[str, float]:
    from affmae.train.checkpoint import load_checkpoint

    path = resume_path(cfg)
    if path is None:
        return {}
    return dict(load_checkpoint(path).get("data_stats") or {})


def run_pretrain(cfg: PretrainConfig) -> TrainResult:
    """Python API: pretrain per ``cfg`` (single process, or one rank under torchrun)."""
    ctx = context_from_env(cfg.device)
    job = PretrainJob(cfg, ctx)  # every input validated here, before any process group
    if ctx.is_main:
        from affmae.train.loop import steps_per_epoch

        n_params = sum(p.numel() for p in job.model.parameters())
        spe = steps_per_epoch(len(job.dataset), cfg)
        total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
        print(f"[affmae] pretrain {cfg.model} ({n_params / 1e6:.2f}M params) on "
              f"{len(job.dataset)} images from {cfg.data} at {cfg.size[0]}x{cfg.size[1]} | "
              f"mean {job.data_stats['mean']:.4f} std {job.data_stats['std']:.4f} | "
              f"{ctx.world_size} rank(s) on {ctx.device}, {cfg.precision}"
              f"{', CUDA graph' if job.graphed is not None else ''} | batch "
              f"{cfg.batch_size} x {cfg.grad_accum} accum | {total} steps "
              f"({spe} per epoch) -> {cfg.out}", file=sys.stderr)
    init_process_group(ctx)
    try:
        return fit(job, ctx)
    finally:
        destroy_process_group()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``affmae pretrain`` (one per ``PretrainConfig`` field, plus ``--config``)."""
    add_config_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    run_pretrain(config_from_args(PretrainConfig, args))
    return 0
