"""Segmentation loss (BCE or focal, plus soft Dice, class-weighted) and IoU scores.

Paper (sec. 5, "Fine-tuning"): "a combined BCE and Dice loss, weighted by class importance";
performance is the mean IoU on the test set. Issue 5 adds an optional focal term and an ignore
index for pixels that augmentation brought in from outside the image.

Loss (``segmentation_loss``), for logits (B, C, H, W) and targets (B, H, W) of class indices:
1. Targets become one-hot channels; each class channel is its own binary problem (one-vs-all,
   sigmoid per class), which is what "BCE" means for a multi-class mask. The predicted class is
   ``argmax`` of the logits (the same as argmax of the sigmoids).
2. Per class c: BCE_c = mean over valid pixels of the binary cross-entropy with logits; with
   ``kind="focal_dice"`` each pixel's term is multiplied by (1 - p_t) ** gamma (Lin et al. 2017).
3. Per class c: soft Dice_c = 1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s) over all valid pixels
   of the batch (batch Dice: a class missing from one image still has a stable ratio), p the
   sigmoid, s = 1. A class absent from the targets and not predicted gives Dice_c = 0.
4. loss = sum_c w_c BCE_c / sum_c w_c + dice_weight * sum_c w_c Dice_c / sum_c w_c, with the
   class weights w (the paper's "class importance"; all 1 by default).
Pixels whose target is ``ignore_index`` contribute to nothing. Everything is computed in float32
whatever the autocast dtype of the logits.
5. Under DDP (``sync=True``) the sums of steps 2-3 (BCE sum, valid-pixel count, Dice
   intersections and denominators) are summed over the ranks first (differentiable
   all-reduce), so every rank computes the loss of the GLOBAL batch of the micro-step: batch
   Dice and the pixel mean are not averages of per-rank values. (With gradient accumulation
   each micro-step has its own batch Dice, in one process as on N ranks.) Gradients: each
   rank's gradient of the global loss comes back multiplied by the world size through the
   all-reduce's backward, and DDP's gradient average divides it out, so a run on N ranks takes
   the same steps as one process with the same global batch (tested).

IoU (``IoUMeter``), accumulated over a whole evaluation set (the standard dataset-level IoU,
not a mean of per-image IoUs): IoU_c = TP_c / (TP_c + FP_c + FN_c) from torchmetrics'
``MulticlassJaccardIndex(average=None)``.

Absent classes (documented decision, tested): a class with no pixel in the targets AND none in
the predictions of the evaluated set has no IoU: it is reported as NaN (``null`` in JSON) and
left out of the mean, so mIoU = nanmean over the classes that occur. A class that is predicted
but absent from the targets has IoU 0 and counts. If no class occurs at all, mIoU is NaN.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1  # target value of pixels that take no part in loss or metrics
LOSSES = ("bce_dice", "focal_dice")
DICE_SMOOTH = 1.0


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, *,
                      class_weights: Sequence[float] | torch.Tensor | None = None,
                      kind: str = "bce_dice", focal_gamma: float = 2.0, dice_weight: float = 1.0,
                      ignore_index: int = IGNORE_INDEX,
                      sync: bool = False) -> dict[str, torch.Tensor]:
    """Class-weighted BCE (or focal) + soft Dice; see the module docstring.

    Args:
        logits: (B, C, H, W) per-pixel class logits (any float dtype).
        target: (B, H, W) int64 class indices in [0, C), or ``ignore_index``.
        class_weights: C non-negative weights (not all zero); None = all 1.
        kind: "bce_dice" or "focal_dice".
        sync: reduce the sums over the default process group (DDP training; every rank must
            call it); ignored when torch.distributed is not initialised or has one rank.
    Returns:
        {"loss", "loss_bce" | "loss_focal", "loss_dice"}: float32 scalars (the parts are the
        class-weighted means before ``dice_weight``).
    """
    if kind not in LOSSES:
        raise ValueError(f"loss kind must be one of {LOSSES}, got {kind!r}")
    if logits.ndim != 4 or target.shape != (logits.shape[0],) + logits.shape[2:]:
        raise ValueError(f"need logits (B, C, H, W) and target (B, H, W), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    C = logits.shape[1]
    w = _weights(class_weights, C, logits.device)
    x = logits.float()
    valid = target != ignore_index  # (B, H, W)
    onehot = F.one_hot(torch.where(valid, target, 0), C).permute(0, 3, 1, 2).float()  # (B, C, H, W)
    v = valid[:, None].float()  # (B, 1, H, W)
    # 1-2. Per-class binary cross-entropy (optionally focal), summed over valid pixels.
    bce = F.binary_cross_entropy_with_logits(x, onehot, reduction="none")  # (B, C, H, W)
    p = torch.sigmoid(x)
    if kind == "focal_dice":
        p_t = p * onehot + (1.0 - p) * (1.0 - onehot)
        bce = bce * (1.0 - p_t).pow(focal_gamma)
    # 3. Soft batch Dice sums per class over valid pixels.
    p = p * v
    sums = torch.stack([(bce * v).sum(dim=(0, 2, 3)),  # (3, C): BCE, intersection, denominator
                        (p * onehot).sum(dim=(0, 2, 3)),
                        p.sum(dim=(0, 2, 3)) + (onehot * v).sum(dim=(0, 2, 3))])
    n_valid = v.sum()
    if sync and _world_size() > 1:  # 5. the global batch's sums
        from torch.distributed.nn.functional import all_reduce

        sums = all_reduce(sums)
        n_valid = all_reduce(n_valid.detach())
    bce_sum, inter, denom = sums.unbind(0)
    per_class_bce = bce_sum / n_valid.clamp_min(1.0)  # (C,)
    dice = 1.0 - (2.0 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)  # (C,)
    # 4. Class-weighted means.
    loss_bce = (w * per_class_bce).sum()
    loss_dice = (w * dice).sum()
    name = "loss_bce" if kind == "bce_dice" else "loss_focal"
    return {"loss": loss_bce + dice_weight * loss_dice, name: loss_bce, "loss_dice": loss_dice}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _weights(class_weights, C: int, device: torch.device) -> torch.Tensor:
    """(C,) weights normalised to sum 1."""
    if class_weights is None:
        return torch.full((C,), 1.0 / C, device=device)
    w = torch.as_tensor(class_weights, dtype=torch.float32, device=device).flatten()
    if w.numel() != C:
        raise ValueError(f"{w.numel()} class weights for {C} classes")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"class weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w / w.sum()


# ----------------------------------------------------------------------------------------------
# IoU
# ----------------------------------------------------------------------------------------------

def metric_key(name: str) -> str:
    """``iou_<name>`` with the name reduced to letters, digits, ``-`` and ``_`` (CSV-safe)."""
    return "iou_" + re.sub(r"[^0-9A-Za-z_-]+", "_", str(name)).strip("_")


def class_keys(class_names: Sequence[str]) -> list[str]:
    """One metric key per class; an error when two names map to the same key."""
    keys = [metric_key(n) for n in class_names]
    if len(set(keys)) != len(keys) or "iou_" in keys:
        raise ValueError(f"class names {list(class_names)} give clashing or empty metric keys "
                         f"{keys}; use distinct names made of letters and digits")
    return keys


class IoUMeter:
    """Accumulates predictions of a whole evaluation set; ``compute`` gives mIoU and per-class IoU.

    ``update(pred, target)``: int64 class indices of equal shape (any leading dims); target
    pixels equal to ``ignore_index`` are skipped. Under an initialised process group torchmetrics
    sums the counts of all ranks in ``compute`` (every rank must call it).
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] = (),
                 device: str | torch.device = "cpu", ignore_index: int = IGNORE_INDEX) -> None:
        from torchmetrics.classification import MulticlassJaccardIndex

        names = list(class_names) or [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        self.keys = class_keys(names)
        self.num_classes = num_classes
        self.metric = MulticlassJaccardIndex(num_classes, average=None, ignore_index=ignore_index,
                                             zero_division=math.nan).to(device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        self.metric.update(pred.reshape(1, -1).long(), target.reshape(1, -1).long())

    def reset(self) -> None:
        self.metric.reset()

    def per_class(self) -> torch.Tensor:
        """(C,) float64 IoU, NaN for classes absent from targets and predictions."""
        return self.metric.compute().double().cpu()

    def compute(self) -> dict[str, float]:
        """{"miou": nanmean, "iou_<name>": ...} as Python floats (NaN = absent class)."""
        iou = self.per_class()
        present = ~torch.isnan(iou)
        miou = float(iou[present].mean()) if present.any() else math.nan
        return {"miou": miou, **{k: float(v) for k, v in zip(self.keys, iou)}}

    @property
    def confmat(self) -> torch.Tensor:
        """(C, C) pixel counts, rows = target class, columns = predicted class (this rank)."""
        return self.metric.confmat.detach().cpu()


def json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN -> None (JSON ``null``); other values unchanged."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
