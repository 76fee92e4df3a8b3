"""Segmentation loss and IoU on hand-made cases (affmae.train.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from affmae.train.metrics import IGNORE_INDEX, IoUMeter, class_keys, segmentation_loss

BIG = 30.0  # logit magnitude that makes sigmoids 0/1 to float precision


def _logits_for(classes: torch.Tensor, C: int, big: float = BIG) -> torch.Tensor:
    """(B, H, W) classes -> (B, C, H, W) logits: +big for the class, -big elsewhere."""
    onehot = torch.nn.functional.one_hot(classes, C).permute(0, 3, 1, 2).float()
    return (2 * onehot - 1) * big


@pytest.fixture
def target() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 3, (2, 8, 8), generator=g)


# ---- loss -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bce_dice", "focal_dice"])
def test_loss_perfect_prediction_is_zero(target, kind):
    out = segmentation_loss(_logits_for(target, 3), target, kind=kind)
    assert out["loss"].item() < 1e-6, f"{kind}: perfect prediction gives loss {out}"


def test_loss_disjoint_prediction_dice_is_one(target):
    wrong = (target + 1) % 3  # every pixel predicts another class
    out = segmentation_loss(_logits_for(wrong, 3), target)
    # no overlap: Dice_c = 1 - s / (|pred_c| + |target_c| + s), s = 1 (-> 1 for large classes)
    want = sum(1 - 1 / ((wrong == c).sum().item() + (target == c).sum().item() + 1)
               for c in range(3)) / 3
    assert abs(out["loss_dice"].item() - want) < 1e-5, f"disjoint Dice {out['loss_dice']} != {want}"
    assert out["loss_bce"].item() > 10, f"disjoint BCE only {out['loss_bce']}"


def test_loss_values_at_zero_logits():
    """Sigmoid 0.5 everywhere: BCE = ln 2 per class; Dice_c = 1 - (n_c + 1) / (N/2 + n_c + 1)."""
    target = torch.tensor([[[0, 0, 0, 1], [1, 1, 0, 0]]])  # 5 of class 0, 3 of class 1, 0 of 2
    out = segmentation_loss(torch.zeros(1, 3, 2, 4), target)
    N, counts = 8, [5, 3, 0]
    dice = [1 - (2 * 0.5 * n + 1) / (0.5 * N + n + 1) for n in counts]
    assert abs(out["loss_bce"].item() - math.log(2)) < 1e-6, out
    assert abs(out["loss_dice"].item() - sum(dice) / 3) < 1e-6, (out, dice)


def test_loss_absent_class_not_predicted_costs_nothing():
    """A class with no target pixel and (near) zero prediction has Dice 0 and BCE ~0."""
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = _logits_for(target, 3)  # class 2: -BIG everywhere
    out = segmentation_loss(logits, target)
    assert out["loss"].item() < 1e-6, out


def test_loss_ignores_ignore_index(target):
    target = target.clone()
    target[:, :2] = IGNORE_INDEX
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    changed = logits.clone()
    changed[:, :, :2] = 100 * torch.randn(2, 3, 2, 8)  # only ignored pixels change
    a = segmentation_loss(logits, target)["loss"]
    b = segmentation_loss(changed, target)["loss"]
    assert torch.allclose(a, b), f"ignored pixels changed the loss: {a} vs {b}"


def test_loss_class_weights(target):
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    same = segmentation_loss(logits, target, class_weights=[2.0, 2.0, 2.0])["loss"]
    plain = segmentation_loss(logits, target)["loss"]
    assert torch.allclose(same, plain), f"equal weights must equal no weights: {same} vs {plain}"
    # Weight 0 on class 2: its channel no longer matters.
    changed = logits.clone()
    changed[:, 2] = torch.randn(2, 8, 8)
    w = [1.0, 3.0, 0.0]
    a = segmentation_loss(logits, target, class_weights=w)["loss"]
    b = segmentation_loss(changed, target, class_weights=w)["loss"]
    assert torch.allclose(a, b), f"class with weight 0 changed the loss: {a} vs {b}"
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        segmentation_loss(logits, target, class_weights=[1.0, 1.0])


def test_focal_gamma_zero_is_bce_and_focal_is_smaller(target):
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    bce = segmentation_loss(logits, target)["loss_bce"]
    f0 = segmentation_loss(logits, target, kind="focal_dice", focal_gamma=0.0)["loss_focal"]
    f2 = segmentation_loss(logits, target, kind="focal_dice", focal_gamma=2.0)["loss_focal"]
    assert torch.allclose(bce, f0), f"focal gamma 0 {f0} != BCE {bce}"
    assert f2 < bce, f"focal gamma 2 {f2} not below BCE {bce}"


def test_loss_is_float32_and_differentiable_under_bf16(target):
    logits = torch.randn(2, 3, 8, 8).bfloat16().requires_grad_()
    out = segmentation_loss(logits, target)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(logits.grad.float()).all()


# ---- IoU ------------------------------------------------------------------------------------

def test_iou_perfect_and_disjoint(target):
    meter = IoUMeter(3, ["a", "b", "c"])
    meter.update(target, target)
    s = meter.compute()
    assert s == {"miou": 1.0, "iou_a": 1.0, "iou_b": 1.0, "iou_c": 1.0}, s
    meter.reset()
    meter.update((target + 1) % 3, target)
    s = meter.compute()
    assert s["miou"] == 0.0 and all(s[k] == 0.0 for k in meter.keys), s


def test_iou_hand_computed():
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    tgt = torch.tensor([0, 0, 1, 1, 2, 0])
    meter = IoUMeter(3)
    meter.update(pred, tgt)
    s = meter.compute()
    # class 0: TP 1, FP 0, FN 2 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FP 1 -> 1/2
    want = [1 / 3, 2 / 3, 1 / 2]
    got = [s["iou_0"], s["iou_1"], s["iou_2"]]
    assert all(abs(g - w) < 1e-6 for g, w in zip(got, want)), (got, want)
    assert abs(s["miou"] - sum(want) / 3) < 1e-6, s


def test_iou_absent_class_is_nan_and_left_out_of_the_mean():
    meter = IoUMeter(4, ["bg", "x", "y", "z"])
    tgt = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 3])  # class 2 nowhere; class 3 predicted but not in target
    meter.update(pred, tgt)
    s = meter.compute()
    assert math.isnan(s["iou_y"]), f"absent class must be NaN, got {s}"
    assert s["iou_z"] == 0.0, f"predicted-but-absent class must be 0, got {s}"
    want = (1.0 + 0.5 + 0.0) / 3  # bg 2/2, x 1/2, z 0: mean over the three present classes
    assert abs(s["miou"] - want) < 1e-6, f"mIoU {s['miou']} != {want}"
    empty = IoUMeter(2)
    empty.update(torch.tensor([0]), torch.tensor([IGNORE_INDEX]))  # the only pixel is ignored
    assert math.isnan(empty.compute()["miou"]), "no class anywhere must give mIoU NaN"


def test_iou_accumulates_over_the_dataset_not_per_image():
    meter = IoUMeter(2)
    meter.update(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]))  # image 1: IoU_1 = 1
    meter.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 0, 0, 0]))  # image 2: IoU_1 = 0
    # pooled: class 1 TP 4, FN 1 -> 4/5 (a per-image mean would give 0.5)
    assert abs(meter.compute()["iou_1"] - 0.8) < 1e-6, meter.compute()


def test_iou_skips_ignored_pixels():
    meter = IoUMeter(2)
    meter.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, IGNORE_INDEX]))
    assert meter.compute()["miou"] == 1.0, meter.compute()


def test_class_keys_are_csv_safe_and_distinct():
    assert class_keys(["Lamina densa", "LRI/PGMI"]) == ["iou_Lamina_densa", "iou_LRI_PGMI"]
    with pytest.raises(ValueError, match="clashing"):
        class_keys(["a b", "a_b"])
