"""``affmae finetune``: semantic segmentation on labelled image/mask pairs (paper sec. 5; DESIGN 5).

    affmae finetune --data DIR [--checkpoint MAE.pt] [--test-data DIR | --val-fraction F]
                    [--class-values 0 255 --class-names membrane cell] [--label-fraction 0.05] ...

Recipe (paper "Fine-tuning"): the pretrained encoder runs unmasked and the decoder is queried at
every patch (``affmae.models.segmentation.Segmenter``); AdamW, linear warmup then cosine,
layer-wise lr decay (LLRD) 0.6, class-weighted BCE + Dice (``metrics.segmentation_loss``),
heavy augmentation (flips, affine, elastic, photometric) on the device batch
(``affmae.data.augment.SegmentationAugment``), mIoU on the test split. Everything else (bf16 /
fp16, DDP, gradient accumulation, atomic checkpoints, exact resume, eval.csv, best.pt) is the
shared loop of ``loop.py``; this module is a ``TrainJob`` plus its configuration.

Set-up, all before the first step (bad input fails at once, naming the problem):
1. the pretrained checkpoint (an MAE, not an already fine-tuned segmenter) or, without one, a
   fresh ``--model`` backbone;
2. the labelled folder: pairs matched, every mask's values checked against the class map (an
   error names the file and the values), normalisation = the pretraining checkpoint's
   ``data_stats`` (the backbone was trained with them), else computed from ``--data`` (a resumed
   run keeps those it started with);
3. the evaluation set: ``--test-data`` (full-size images, sliding window of the training size),
   or a seeded ``--val-fraction`` of the pairs (TIFF pages count as pairs); ``--label-fraction``
   then keeps a seeded, nested subset of the training pairs;
4. the model with C = number of classes, and one optimizer group per (decay, LLRD scale): the
   factor ``layer_decay ** (L + 1 - layer_id)`` is each group's ``lr_scale``, which
   ``schedule.set_lr`` multiplies in at EVERY step (so it stays in force after the first step).

Deliberate choices:
* ``--layer-decay`` defaults to 0.6 with a checkpoint and 1.0 (none) from scratch: decaying the
  lr of randomly initialised lower layers would only cripple the from-scratch baseline.
* AdamW betas default to (0.9, 0.999) (the paper gives only the pretraining betas).
* Augmentation pads with zeros and marks pixels brought in from outside the image with
  ``IGNORE_INDEX`` (no loss there); ``--aug-padding reflection`` mirrors instead.
* When the training pairs are fewer than one effective batch (``--label-fraction`` runs), an
  epoch shows every pair ``ceil(batch / pairs)`` times, each repeat with its own crops, so a
  5% run with a normal batch size works; one "epoch" is then that repeated pass.
* The loop keeps ``best.pt`` by mIoU; after training, rank 0 converts it to ``best.safetensors``
  and rewrites ``model.safetensors`` so both carry the class map and window (``extra``), and
  writes ``metrics.json`` (best and last evaluation). If the run is killed, ``best.pt`` is
  current but ``best.safetensors`` is written at the end of the (resumed) run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from affmae.train.config import TrainConfig, add_config_arguments, config_from_args, opt
from affmae.train.distributed import (DistContext, context_from_env, destroy_process_group,
                                      init_process_group)
from affmae.train.graphs import setup_cuda_graph
from affmae.train.loop import TrainJob, TrainResult, fit, resume_path, steps_per_epoch
from affmae.train.metrics import (IGNORE_INDEX, LOSSES, IoUMeter, class_keys, json_safe,
                                  segmentation_loss)
from affmae.train.optim import param_groups
from affmae.train.predict import (SegmentationInfo, full_pair, open_labelled,
                                  save_prediction_figure, score_pairs)

FIGURE_IMAGES = 4  # rows of the prediction figure
DEFAULT_LAYER_DECAY = 0.6  # paper
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_FOCAL_GAMMA = 2.0


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """Segmentation fine-tuning (paper sec. 5): labelled pairs (+ MAE checkpoint) -> segmenter."""

    # --- data -----------------------------------------------------------------------------
    data: str = opt(help="labelled folder: DIR/images and DIR/masks matched by relative path "
                    "without suffix (PNG/TIFF; masks as values, RGB(A) with R=G=B accepted), "
                    "optional DIR/classes.yaml {value: name}", group="data", metavar="DIR")
    test_data: str | None = opt(None, "separate labelled test folder (same layout) for the "
                                "evaluation; excludes --val-fraction", group="data",
                                metavar="DIR")
    val_fraction: float | None = opt(None, "hold out this seeded fraction of the --data pairs "
                                     f"for evaluation ({DEFAULT_VAL_FRACTION} if neither this "
                                     "nor --test-data is given; 0 = no evaluation, no best.pt)",
                                     group="data")
    label_fraction: float = opt(1.0, "train on a seeded subset with this fraction of the "
                                "training pairs (nested: the 5% pairs are inside the 25% ones)",
                                group="data")
    crop: Literal["random_crop", "center_crop", "resize"] = opt(
        "random_crop", "how a training pair becomes SIZE: random_crop (seeded), center_crop, "
        "or resize (aspect ratio not kept)", group="data")
    class_values: tuple[int, ...] | None = opt(
        None, "mask values in class order, e.g. 0 255 (none given: the keys of "
        "DIR/classes.yaml, else the sorted values found in the masks); other values in a mask "
        "are an error",
        group="data", flag_type=int, nargs="+", metavar="V")
    class_names: tuple[str, ...] | None = opt(
        None, "one name per class (none given: DIR/classes.yaml, else the values)", group="data",
        flag_type=str, nargs="+", metavar="NAME")

    # --- model ----------------------------------------------------------------------------
    checkpoint: str | None = opt(None, "pretrained MAE checkpoint (.pt or .safetensors from "
                                 "affmae pretrain); none = train from scratch", group="model",
                                 metavar="CKPT")
    model: str | None = opt(None, "backbone when training from scratch (none given: "
                            "aff_small); with --checkpoint it must match the checkpoint's "
                            "model or be left out", group="model")

    # --- loss -----------------------------------------------------------------------------
    loss: Literal["bce_dice", "focal_dice"] = opt(
        "bce_dice", "per-class sigmoid BCE + soft Dice (paper), or focal + soft Dice",
        group="loss")
    class_weights: tuple[float, ...] | None = opt(
        None, "one weight per class for both terms (paper FPW: 0.2 2 3 2 3); none = all 1",
        group="loss", flag_type=float, nargs="+", metavar="W")
    dice_weight: float = opt(1.0, "weight of the Dice term relative to BCE/focal",
                             group="loss")
    focal_gamma: float | None = opt(None, "focusing exponent of --loss focal_dice (none given: "
                                    f"{DEFAULT_FOCAL_GAMMA})", group="loss")

    # --- optimisation (fine-tuning defaults) ----------------------------------------------
    batch_size: int = opt(16, "GLOBAL pairs per micro-step, summed over all ranks",
                          group="optimisation")
    grad_accum: int = opt(1, "micro-steps accumulated per optimizer step", group="optimisation")
    steps: int | None = opt(None, "total optimizer steps (mutually exclusive with --epochs; if "
                            "neither is given: 700 epochs, the paper's)", group="optimisation")
    epochs: int | None = opt(None, "total epochs over the training pairs", group="optimisation")
    lr: float = opt(1e-4, "peak learning rate of the top layers (decoder, head), absolute for "
                    "the effective batch", group="optimisation")
    warmup_steps: int = opt(250, "linear warmup in optimizer steps (paper: 25 epochs)",
                            group="optimisation")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas", group="optimisation",
                                     flag_type=float, nargs="2", metavar="BETA")
    layer_decay: float | None = opt(
        None, f"layer-wise lr decay: layer i of L gets lr * decay ** (L + 1 - i) (none "
        f"given: {DEFAULT_LAYER_DECAY} with --checkpoint, 1 = no decay from scratch)",
        group="optimisation")

    # --- augmentation ---------------------------------------------------------------------
    augment: bool = opt(True, "flips, affine, elastic and photometric augmentation of each "
                        "training batch on its device", group="augmentation")
    aug_padding: Literal["zeros", "reflection"] = opt(
        "zeros", "pixels moved in from outside the image: zeros (ignored by the loss) or "
        "reflection (mirrored image and labels)", group="augmentation")

    # --- evaluation -----------------------------------------------------------------------
    eval_every: int = opt(500, "evaluate mIoU / per-class IoU on the test split every N steps "
                          "(and at the end) and keep best.pt (0 = never)",
                          group="evaluation")
    eval_overlap: float = opt(0.5, "sliding-window overlap for evaluation images larger than "
                              "SIZE", group="evaluation")
    eval_batch: int = opt(4, "windows per forward pass in evaluation", group="evaluation")

    # --- output ---------------------------------------------------------------------------
    out: str = opt("runs/finetune", "output folder: log.csv, eval.csv, metrics.json, "
                   "latest.pt, best.pt, best.safetensors, model.safetensors, figures/, "
                   "config.yaml", group="output")
    figure_every: int = opt(1000, "save a prediction figure (image | target | prediction of "
                            "evaluation images) every N steps and at the end (0 = never)",
                            group="output")

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None:
            self.epochs = 700
        super().__post_init__()
        if self.test_data is not None and self.val_fraction is not None:
            raise ValueError(f"give --test-data ({self.test_data}) or --val-fraction "
                             f"({self.val_fraction}), not both")
        if self.test_data is None and self.val_fraction is None:
            self.val_fraction = DEFAULT_VAL_FRACTION
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.crop not in ("random_crop", "center_crop", "resize"):
            raise ValueError(f"crop must be random_crop, center_crop or resize, got {self.crop!r}")
        if self.class_values is not None:
            self.class_values = tuple(int(v) for v in self.class_values)
            if len(set(self.class_values)) != len(self.class_values) or not self.class_values:
                raise ValueError(f"class_values must be distinct, got {self.class_values}")
        if self.class_names is not None:
            self.class_names = tuple(str(n) for n in self.class_names)
            class_keys(self.class_names)  # distinct, CSV-safe metric names
            if self.class_values is not None and len(self.class_names) != len(self.class_values):
                raise ValueError(f"{len(self.class_names)} class names {self.class_names} for "
                                 f"{len(self.class_values)} class values {self.class_values}")
        if self.class_weights is not None:
            self.class_weights = tuple(float(w) for w in self.class_weights)
            if not all(math.isfinite(w) and w >= 0 for w in self.class_weights) or not any(
                    self.class_weights):
                raise ValueError(f"class_weights must be finite, >= 0 and not all 0, got "
                                 f"{self.class_weights}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.focal_gamma is not None:
            if self.loss != "focal_dice":
                raise ValueError(f"focal_gamma ({self.focal_gamma}) needs --loss focal_dice "
                                 f"(loss is {self.loss!r})")
            if not self.focal_gamma >= 0:
                raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if not self.dice_weight >= 0:
            raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.aug_padding not in ("zeros", "reflection"):
            raise ValueError(f"aug_padding must be zeros or reflection, got {self.aug_padding!r}")
        if self.eval_every < 0 or self.eval_batch < 1:
            raise ValueError(f"need eval_every >= 0 and eval_batch >= 1, got {self.eval_every} "
                             f"and {self.eval_batch}")
        if not 0.0 <= self.eval_overlap < 1.0:
            raise ValueError(f"eval_overlap must be in [0, 1), got {self.eval_overlap}")


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------

class RepeatedPairs(Dataset):
    """``base`` shown ``repeats`` times per epoch; repeat r of epoch e draws its crops as epoch
    ``e * repeats + r`` of ``base`` (so repeats differ and resume stays exact)."""

    def __init__(self, base: Any, repeats: int) -> None:
        self.base, self.repeats, self.epoch = base, int(repeats), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base) * self.repeats

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        r, j = divmod(int(i), len(self.base))
        return self.base[(epoch * self.repeats + r, j)]


class FinetuneJob(TrainJob):
    """Segmentation fine-tuning: (image, mask) batches in, BCE/focal + Dice out; mIoU evaluation."""

    name = "finetune"
    best_metric = "miou"
    best_mode = "max"

    def __init__(self, cfg: FinetuneConfig, ctx: DistContext) -> None:
        from affmae.data.augment import SegmentationAugment
        from affmae.data.datasets import SegmentationFolder, fraction_indices, split_indices

        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.seed)  # same initialisation on every rank
        # 1. Backbone source: pretrained checkpoint or a fresh model.
        pretrained, backbone = _backbone_source(cfg)
        patch = int(pretrained["model_config"]["patch_size"]) if pretrained else int(
            backbone.patch_size)
        h, w = cfg.size
        if h % patch or w % patch:
            raise ValueError(f"size {cfg.size} (H, W) is not a multiple of the patch size {patch}")
        # 2. Labelled data; normalisation: resumed run > pretraining checkpoint > --data.
        stats = _resumed_stats(cfg) or dict((pretrained or {}).get("data_stats") or {})
        full = SegmentationFolder(cfg.data, cfg.size, patch_size=patch, mode=cfg.crop,
                                  class_values=cfg.class_values, mean=stats.get("mean"),
                                  std=stats.get("std"), seed=cfg.seed)
        self.data_stats = {"mean": float(full.mean), "std": float(full.std)}
        names = tuple(cfg.class_names) if cfg.class_names else tuple(full.class_names)
        if len(names) != full.num_classes:
            raise ValueError(f"{len(names)} class names {names} for the {full.num_classes} "
                             f"classes with mask values {full.class_values}")
        class_keys(names)
        if cfg.class_weights is not None and len(cfg.class_weights) != full.num_classes:
            raise ValueError(f"{len(cfg.class_weights)} class weights {cfg.class_weights} for "
                             f"{full.num_classes} classes {names}")
        self.info = SegmentationInfo(tuple(full.class_values), names, tuple(cfg.size),
                                     self.data_stats["mean"], self.data_stats["std"])
        # 3. Evaluation set and training subset.
        if cfg.test_data is not None:
            self.eval_set = open_labelled(cfg.test_data, full.class_values, patch, full.mean,
                                          full.std)
            train_idx, self.eval_idx = list(range(len(full))), list(range(len(self.eval_set)))
        else:
            train_idx, self.eval_idx = split_indices(len(full), cfg.val_fraction, cfg.seed)
            self.eval_set = full
        train_idx = fraction_indices(train_idx, cfg.label_fraction, cfg.seed)
        self.n_train = len(train_idx)
        effective = cfg.batch_size * cfg.grad_accum
        self.repeats = max(1, math.ceil(effective / self.n_train))
        self.dataset = RepeatedPairs(full.subset(train_idx), self.repeats)
        self.eval_every = cfg.eval_every if self.eval_idx else 0
        # 4. Model, LLRD.
        self.model = _build_model(cfg, pretrained, backbone, full.num_classes, names)
        self.layer_decay = cfg.layer_decay if cfg.layer_decay is not None else (
            DEFAULT_LAYER_DECAY if cfg.checkpoint else 1.0)
        self.augment = None
        if cfg.augment:
            self.augment = SegmentationAugment(mean=full.mean, std=full.std,
                                               padding=cfg.aug_padding,
                                               ignore_index=IGNORE_INDEX)
        self.class_weights = (torch.tensor(cfg.class_weights, device=ctx.device)
                              if cfg.class_weights is not None else None)
        self.focal_gamma = cfg.focal_gamma if cfg.focal_gamma is not None else DEFAULT_FOCAL_GAMMA
        # 5. Forward + loss replayed as a CUDA graph where it can run (augmentation stays
        #    eager); one process only: the loss all-reduces its Dice sums over the ranks.
        self.graphed = setup_cuda_graph(self, self._forward_loss, ranks_ok=False)
        self.history: list[dict[str, float]] = []

    # ---- loop hooks -------------------------------------------------------------------------

    def lr_scale(self, name: str) -> float:
        """LLRD factor of a parameter: ``layer_decay ** (L + 1 - layer_id(name))``."""
        L = self.model.num_layers
        return self.layer_decay ** (L + 1 - self.model.layer_id(name))

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.cfg.weight_decay, self.lr_scale)

    def loss(self, model: nn.Module, batch: Any, step: int, micro: int) -> dict[str, torch.Tensor]:
        imgs, targets = batch
        if self.augment is not None:
            # Geometry and intensities in fp32 whatever the autocast dtype.
            with torch.autocast(imgs.device.type, enabled=False):
                imgs, targets = self.augment(imgs, targets)
        if self.graphed is not None:  # the loop never wraps a graphed job's model in DDP
            return self.graphed(imgs, targets)
        return self._forward_loss(model, imgs, targets)

    def _forward_loss(self, model: nn.Module, imgs: torch.Tensor,
                      targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(imgs)  # (B, C, H, W)
        return segmentation_loss(logits, targets, class_weights=self.class_weights,
                                 kind=self.cfg.loss, focal_gamma=self.focal_gamma,
                                 dice_weight=self.cfg.dice_weight, sync=True)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"data_stats": dict(self.data_stats),
                "extra": {"segmentation": self.info.to_dict()}}

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        dev = self.ctx.device
        meter = IoUMeter(len(self.info.class_values), self.info.class_names, dev)
        mine = self.eval_idx[self.ctx.rank::self.ctx.world_size]
        score_pairs(model, self.eval_set, mine, meter, dev, self.cfg.size, self.cfg.eval_overlap,
                    self.cfg.eval_batch)
        scores = meter.compute()  # counts summed over ranks under DDP
        self.history.append({"step": step, **scores})
        return scores

    def figure(self, model: nn.Module, path: Path, step: int) -> None:
        from affmae.train.predict import sliding_window_logits

        source = self.eval_set if self.eval_idx else self.dataset.base
        idx = (self.eval_idx or list(range(len(source))))[:FIGURE_IMAGES]
        imgs, tgts, preds = [], [], []
        for i in idx:
            img, tgt = full_pair(source, i)
            logits = sliding_window_logits(model, img[None].to(self.ctx.device), self.cfg.size,
                                           self.cfg.eval_overlap, self.cfg.eval_batch)
            imgs.append(img[0].numpy())
            tgts.append(tgt.numpy())
            preds.append(logits.argmax(1)[0].cpu().numpy())
        save_prediction_figure(path, imgs, tgts, preds, self.info.class_names,
                               title=f"{self.model.config.backbone}, step {step}")


def _backbone_source(cfg: FinetuneConfig) -> tuple[dict | None, nn.Module | None]:
    """(pretraining checkpoint dict, None) or (None, fresh backbone)."""
    from affmae import create_model
    from affmae.models.registry import read_checkpoint

    if cfg.checkpoint is None:
        return None, create_model(cfg.model or "aff_small", **cfg.model_overrides)
    ckpt = read_checkpoint(cfg.checkpoint)
    name = ckpt["model_name"]
    if name == "segmenter":
        raise ValueError(f"{cfg.checkpoint} is already a fine-tuned segmenter; pass the "
                         "pretraining checkpoint, or --resume to continue this fine-tuning")
    if cfg.model is not None and cfg.model != name:
        raise ValueError(f"--model {cfg.model} differs from the checkpoint's model {name!r} "
                         f"({cfg.checkpoint}); leave --model out")
    return ckpt, None


def _build_model(cfg: FinetuneConfig, pretrained: dict | None, backbone: nn.Module | None,
                 num_classes: int, names: tuple[str, ...]) -> nn.Module:
    from affmae.models.registry import config_dict
    from affmae.models.segmentation import Segmenter, SegmenterConfig

    try:
        if pretrained is not None:
            model = Segmenter.from_pretrained(cfg.checkpoint, num_classes, names,
                                              **cfg.model_overrides)
        else:
            seg_cfg = SegmenterConfig(backbone=backbone.model_name,
                                      backbone_config=config_dict(backbone),
                                      num_classes=num_classes, class_names=names)
            model = Segmenter(seg_cfg, backbone)
    except AttributeError as e:  # a backbone family without the fine-tuning interface
        family = pretrained["model_name"] if pretrained else backbone.model_name
        raise ValueError(f"model {family!r} cannot be fine-tuned yet: it lacks the segmentation "
                         f"interface (dense_features, strip_pretraining_heads, layer_id): {e}"
                         ) from e
    model.model_name = "segmenter"
    return model


def _resumed_stats(cfg: FinetuneConfig) -> dict[str, float]:
    from affmae.train.checkpoint import load_checkpoint

    path = resume_path(cfg)
    return dict(load_checkpoint(path).get("data_stats") or {}) if path is not None else {}


# ----------------------------------------------------------------------------------------------
# Outputs after training
# ----------------------------------------------------------------------------------------------

def save_segmenter_safetensors(state_dict: dict[str, torch.Tensor], model_config: dict,
                               path: str | Path, data_stats: dict, extra: dict) -> None:
    """Weights of a segmenter with ``model_name``, ``model_config``, ``data_stats`` and ``extra``
    metadata (``registry.read_checkpoint`` / ``predict.load_segmenter`` read all four)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {"model_name": "segmenter", "model_config": json.dumps(model_config),
            "data_stats": json.dumps(data_stats), "extra": json.dumps(extra)}
    tmp = Path(str(path) + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)


@dataclasses.dataclass
class FinetuneResult:
    """What ``run_finetune`` returns: the loop's result plus the best and the last evaluation
    ({"step", "miou", "iou_<class>"...}; None without an evaluation set)."""

    train: TrainResult
    best: dict[str, float] | None
    last: dict[str, float] | None
    out: Path


def _finish(job: FinetuneJob, result: TrainResult) -> FinetuneResult:
    """Rank 0: best.safetensors, model.safetensors with extras, metrics.json."""
    from affmae.models.registry import config_dict
    from affmae.train.checkpoint import load_checkpoint
    from affmae.train.logger import read_log

    out = Path(job.cfg.out)
    extra = job.checkpoint_extra()
    save_segmenter_safetensors(job.model.state_dict(), config_dict(job.model),
                               out / "model.safetensors", extra["data_stats"], extra["extra"])
    best = last = None
    if (out / "best.pt").is_file():
        ckpt = load_checkpoint(out / "best.pt")
        save_segmenter_safetensors(ckpt["model"], ckpt["model_config"], out / "best.safetensors",
                                   ckpt["data_stats"], ckpt["extra"])
        best_step = ckpt["best"]["step"]
        rows = read_log(out / "eval.csv") if (out / "eval.csv").is_file() else []
        by_step = {int(r["step"]): r for r in rows}
        best = by_step.get(best_step, {"step": best_step, "miou": ckpt["best"]["value"]})
        last = rows[-1] if rows else None
    summary = {"best": json_safe(best) if best else None,
               "last": json_safe(last) if last else None,
               "class_values": list(job.info.class_values),
               "class_names": list(job.info.class_names),
               "train_pairs": job.n_train, "eval_pairs": len(job.eval_idx),
               "layer_decay": job.layer_decay, "config": job.cfg.to_dict()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return FinetuneResult(result, best, last, out)


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Python API: fine-tune per ``cfg`` (single process, or one rank under torchrun)."""
    ctx = context_from_env(cfg.device)
    job = FinetuneJob(cfg, ctx)  # every input validated here, before any process group
    if ctx.is_main:
        spe = steps_per_epoch(len(job.dataset), cfg)
        total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
        n_params = sum(p.numel() for p in job.model.parameters())
        source = cfg.checkpoint or f"scratch ({job.model.config.backbone})"
        repeat = f" (each shown {job.repeats}x per epoch)" if job.repeats > 1 else ""
        evaluation = (f"{len(job.eval_idx)} evaluation pair(s) every {job.eval_every} steps"
                      if job.eval_every else "no evaluation (no best.pt)")
        print(f"[affmae] finetune {source} ({n_params / 1e6:.2f}M params), "
              f"{len(job.info.class_values)} classes {list(job.info.class_names)} (mask values "
              f"{list(job.info.class_values)}) | {job.n_train} training pair(s){repeat} at "
              f"{cfg.size[0]}x{cfg.size[1]}, {evaluation} | mean {job.data_stats['mean']:.4f} "
              f"std {job.data_stats['std']:.4f} | layer decay {job.layer_decay:g} over "
              f"{job.model.num_layers} layers | {ctx.world_size} rank(s) on {ctx.device}, "
              f"{cfg.precision}{', CUDA graph' if job.graphed is not None else ''} | {total} "
              f"steps ({spe} per epoch) -> {cfg.out}", file=sys.stderr)
    init_process_group(ctx)
    try:
        result = fit(job, ctx)
        if ctx.is_main:
            return _finish(job, result)
        return FinetuneResult(result, None, None, Path(cfg.out))
    finally:
        destroy_process_group()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``affmae finetune`` (one per ``FinetuneConfig`` field, plus ``--config``)."""
    add_config_arguments(parser, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    res = run_finetune(config_from_args(FinetuneConfig, args))
    if res.best is not None:
        scores = ", ".join(f"{k[4:]} {v:.4f}" for k, v in res.best.items()
                           if k.startswith("iou_"))
        print(f"[affmae] best mIoU {res.best['miou']:.4f} at step {int(res.best['step'])} "
              f"({scores}); weights: {res.out / 'best.safetensors'}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# Demo hook (affmae demo, after pretraining)
# ----------------------------------------------------------------------------------------------

def demo_config(pretrained_ckpt: str | Path | None, data_dir: str | Path, out_dir: str | Path,
                steps: int, device: str = "cpu") -> FinetuneConfig:
    """The demo's fine-tuning recipe: aff_tiny on 64 px crops of the synthetic labels, 16
    evaluation images, one evaluation at the end; lr 3e-3 because the run is short (measured on
    the demo data: 1e-3 leaves membranes and mitochondria unlearnt after 150 steps)."""
    return FinetuneConfig(
        data=str(data_dir), checkpoint=str(pretrained_ckpt) if pretrained_ckpt else None,
        model=None if pretrained_ckpt else "aff_tiny", size=64, crop="random_crop",
        val_fraction=0.0625, batch_size=8, grad_accum=1, steps=steps, lr=3e-3,
        warmup_steps=max(1, steps // 10), min_lr=1e-5, device=device, precision="fp32",
        num_workers=0, seed=0, out=str(out_dir), log_every=max(1, steps // 10),
        ckpt_every=steps, eval_every=steps, figure_every=steps, eval_batch=8)


def finetune_demo(pretrained_ckpt: str | Path | None, data_dir: str | Path,
                  out_dir: str | Path, steps: int, device: str = "cpu") -> dict:
    """Fine-tune ``aff_tiny`` from ``pretrained_ckpt`` (None: from scratch) on the synthetic
    labelled folder ``data_dir`` (images/, masks/, classes.yaml) for ``steps`` steps; prints and
    returns {"miou", "per_class" {name: IoU}, "step", "seconds", "checkpoint", "figure"}."""
    t0 = time.perf_counter()
    res = run_finetune(demo_config(pretrained_ckpt, data_dir, out_dir, steps, device))
    seconds = time.perf_counter() - t0
    best = res.best or {}
    names = json.loads((res.out / "metrics.json").read_text())["class_names"]
    per_class = {n: best.get(k, math.nan) for n, k in zip(names, class_keys(names))}
    figures = sorted((res.out / "figures").glob("*.png"))
    print(f"[demo] fine-tuning: {len(res.train.losses)} steps in {seconds:.0f} s; held-out "
          f"mIoU {best.get('miou', math.nan):.3f} ("
          + ", ".join(f"{n} {v:.3f}" for n, v in per_class.items()) + ")")
    print(f"[demo] prediction figure: {figures[-1] if figures else 'none'}; segmenter: "
          f"{res.out / 'best.safetensors'}")
    return {"miou": best.get("miou", math.nan), "per_class": per_class,
            "step": int(best["step"]) if best else None, "seconds": seconds,
            "checkpoint": res.out / "best.pt", "figure": figures[-1] if figures else None}
