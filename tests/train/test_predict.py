"""Sliding-window inference, ``affmae predict`` and ``affmae evaluate`` (affmae.train.predict).

Why two kinds of sliding-window checks: AFF's decoder queries carry absolute position
embeddings and its clustering and top-k merging see the whole token set, so a window's logits
depend on where it starts and what else it holds; sliding-window and whole-image logits of the
real model can only agree approximately. Hence:
1. the blending machinery against a stand-in that IS equivariant to shifts by whole patches
   (per-pixel + per-patch terms): sliding == whole to float precision;
2. the real model: exact where one window alone covers a pixel, identical to a plain forward when
   the image fits the window, and, after a short training so that its logits depend on content,
   correlated with the whole-image logits (> 0.95) far above a different image's (< 0.5).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from labelled import NAMES, VALUES, write_labelled
from affmae import create_model
from affmae.data.synthetic import generate
from affmae.train.predict import (axis_weights, evaluate_checkpoint, load_segmenter,
                                  sliding_window_logits, window_starts)



@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A 2-step fine-tuned aff_tiny segmenter (32 px training window) and its data folder."""
    from affmae.train.finetune import FinetuneConfig, run_finetune

    root = tmp_path_factory.mktemp("pred")
    data = write_labelled(root / "data", 8, (48, 48), seed=0)
    cfg = FinetuneConfig(data=str(data), model="aff_tiny", size=32, batch_size=4, steps=2,
                         warmup_steps=1, val_fraction=0.25, eval_every=2, device="cpu",
                         num_workers=0, out=str(root / "run"), progress=False, lr=1e-3)
    run_finetune(cfg)
    return root / "run", data


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images to predict: 48 x 48 PNG, 40 x 72 PNG in a subfolder, a 2-page 40 x 48 TIFF."""
    root = tmp_path_factory.mktemp("imgs")
    a, _ = generate(1, (48, 48), seed=5)
    b, _ = generate(1, (40, 72), seed=6)
    c, _ = generate(2, (40, 48), seed=7)
    Image.fromarray(a[0]).save(root / "a.png")
    (root / "sub").mkdir()
    Image.fromarray(b[0]).save(root / "sub" / "b.png")
    tifffile.imwrite(root / "c.tif", c)
    return root


# ---- window layout ----------------------------------------------------------------------------

def test_window_starts_cover_and_stay_aligned():
    assert window_starts(32, 32, 16) == [0]
    assert window_starts(24, 32, 16) == [0]
    starts = window_starts(104, 32, 16)
    assert starts == [0, 16, 32, 48, 64, 72], starts
    assert starts[-1] + 32 == 104, "last window must be flush with the border"


def test_axis_weights_ramp_only_towards_neighbours():
    first, middle, last = (axis_weights(192, 64, s, 16) for s in (0, 64, 128))
    assert first[0] == 1 and first[-1] < 0.1, "first window fades only at its far side"
    assert last[-1] == 1 and last[0] < 0.1, "last window fades only at its near side"
    assert middle[0] < 0.1 and middle[-1] < 0.1 and (middle[16:48] == 1).all(), middle
    assert all((w > 0).all() for w in (first, middle, last)), "weights must never be 0"
    assert (axis_weights(96, 32, 32, 0) == 1).all(), "no overlap: no ramp"


# ---- blending with an equivariant stand-in ------------------------------------------------------

class PatchEquivariant(nn.Module):
    """Per-pixel 1x1 conv plus a per-patch term (8 x 8 mean -> 1x1 conv -> nearest upsampling):
    exactly equivariant to shifts by multiples of the patch, sensitive to misaligned windows."""

    patch_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.pixel = nn.Conv2d(1, 3, 1)
        self.patch = nn.Conv2d(1, 3, 1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        coarse = self.patch(nn.functional.avg_pool2d(x, 8))
        return torch.tanh(self.pixel(x)) + nn.functional.interpolate(coarse, scale_factor=8.0)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_sliding_window_equals_whole_image_for_an_equivariant_model(overlap):
    torch.manual_seed(0)
    model = PatchEquivariant()
    x = torch.randn(2, 1, 70, 101)  # not multiples of 8: padding is exercised too
    whole = sliding_window_logits(model, x, window=None)
    model.calls.clear()
    slid = sliding_window_logits(model, x, window=(32, 40), overlap=overlap, batch_size=3)
    assert slid.shape == whole.shape == (2, 3, 70, 101)
    windows = sum(c[0] for c in model.calls) // 2  # crops per image
    assert windows >= 9 and all(c[-2:] == (32, 40) for c in model.calls), model.calls
    err = (slid - whole).abs().max().item()
    assert err < 1e-5, f"sliding vs whole max error {err} at overlap {overlap}"


# ---- the real model ---------------------------------------------------------------------------

def test_real_model_single_window_regions_and_small_images_are_exact():
    torch.manual_seed(0)
    model = create_model("segmenter", backbone="aff_tiny", num_classes=3).eval()
    x = torch.randn(1, 1, 64, 96)
    slid = sliding_window_logits(model, x, window=(32, 32), overlap=0.5)
    with torch.no_grad():
        first = model(x[..., :32, :32])  # window (0, 0); the next windows start at 16
        fits = model(x[..., :32, :48])
    err = (slid[..., :16, :16] - first[..., :16, :16]).abs().max().item()
    assert err < 1e-5, f"pixels seen by one window only differ from its logits by {err}"
    small = sliding_window_logits(model, x[..., :32, :48], window=(32, 48))
    assert torch.equal(small, fits), "an image that fits the window must be one plain forward"


@pytest.fixture(scope="module")
def trained_tiny():
    """aff_tiny segmenter after 30 steps on synthetic 32 px crops (logits depend on content)."""
    from affmae.train.metrics import segmentation_loss

    torch.manual_seed(0)
    model = create_model("segmenter", backbone="aff_tiny", num_classes=3)
    imgs, labels = generate(32, (64, 64), seed=5)
    X = torch.from_numpy(imgs).float()[:, None] / 255
    X = (X - X.mean()) / X.std()
    Y = torch.from_numpy(labels).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, 32, (8,), generator=g)
        oy, ox = torch.randint(0, 33, (2,), generator=g).tolist()
        loss = segmentation_loss(model(X[idx, :, oy:oy + 32, ox:ox + 32]),
                                 Y[idx, oy:oy + 32, ox:ox + 32])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _centred_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean(dim=(0, 2, 3), keepdim=True)
    b = b - b.mean(dim=(0, 2, 3), keepdim=True)
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_real_model_sliding_window_agrees_loosely_with_whole_image(trained_tiny):
    imgs, _ = generate(2, (64, 96), seed=3)
    x = torch.from_numpy(imgs).float()[:, None] / 255
    x = (x - x.mean()) / x.std()
    with torch.no_grad():
        whole = trained_tiny(x)
    slid = sliding_window_logits(trained_tiny, x, window=(32, 32), overlap=0.5, batch_size=8)
    same = _centred_corr(slid, whole)
    other = _centred_corr(slid.flip(0), whole)  # control: the other image's logits
    assert same > 0.95 and other < 0.5, (f"sliding vs whole correlation {same:.3f} (want > 0.95)"
                                         f", control {other:.3f} (want < 0.5)")


# ---- checkpoints, predict, evaluate -----------------------------------------------------------

def test_load_segmenter_reads_class_map_window_and_stats(finetuned):
    run, _ = finetuned
    for name in ("best.pt", "best.safetensors", "model.safetensors", "latest.pt"):
        model, info = load_segmenter(run / name)
        assert info.class_values == VALUES and info.class_names == NAMES, (name, info)
        assert info.window == (32, 32) and info.std > 0, (name, info)
        assert model.num_classes == 3 and not model.training


def test_load_segmenter_rejects_a_pretraining_checkpoint(tmp_path):
    from affmae.models.registry import save_safetensors

    mae = create_model("aff_tiny")
    save_safetensors(mae, tmp_path / "mae.safetensors", data_stats={"mean": 0.5, "std": 0.2})
    with pytest.raises(ValueError, match="not a fine-tuned segmenter"):
        load_segmenter(tmp_path / "mae.safetensors")


def test_predict_cli_writes_masks_with_the_original_values(finetuned, images, tmp_path):
    from affmae.cli import main
    from affmae.data.io import read_image

    run, _ = finetuned
    out = tmp_path / "masks"
    rc = main(["predict", "--checkpoint", str(run / "best.safetensors"), "--images",
               str(images), "--out", str(out), "--overlay", "--no-progress"])
    assert rc == 0
    expect = {"a.png": (48, 48), "sub/b.png": (40, 72), "c_p0000.png": (40, 48),
              "c_p0001.png": (40, 48)}
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")
                     if "overlays" not in p.parts)
    assert written == sorted(expect), written
    model, info = load_segmenter(run / "best.safetensors")
    for name, shape in expect.items():
        m = np.asarray(Image.open(out / name))
        assert m.shape == shape and m.dtype == np.uint8, (name, m.shape, m.dtype)
        assert set(np.unique(m).tolist()) <= set(VALUES), (name, np.unique(m))
        ov = np.asarray(Image.open(out / "overlays" / name))
        assert ov.shape == shape + (3,), (name, ov.shape)
    # The written values are the model's argmax mapped through the class map.
    raw = read_image(images / "sub" / "b.png")[0]
    x = (torch.from_numpy(raw) - info.mean) / info.std
    classes = sliding_window_logits(model, x[None, None], info.window).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "sub" / "b.png")),
                                  np.asarray(VALUES)[classes])


def _evaluate(argv: list[str]) -> int:
    """``affmae evaluate ...``; errors raise (``--traceback``) so their messages can be checked."""
    from affmae.cli import main

    return main(["--traceback", "evaluate", *argv])


def test_evaluate_checkpoint_and_predictions_agree(finetuned, tmp_path, capsys):
    from affmae.train.predict import predict_folder

    run, data = finetuned
    ckpt = run / "best.pt"
    pred = tmp_path / "pred"
    predict_folder(ckpt, data / "images", pred, progress=False)
    assert _evaluate(["--checkpoint", str(ckpt), "--data", str(data), "--out",
                      str(tmp_path / "a.json"), "--no-progress"]) == 0
    assert _evaluate(["--pred", str(pred), "--data", str(data), "--out",
                      str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["miou"] == pytest.approx(b["miou"], abs=1e-9) and a["images"] == 8, (a, b)
    assert list(a["per_class"]) == list(NAMES) and a["class_values"] == list(VALUES)
    direct = evaluate_checkpoint(ckpt, data, progress=False)
    assert math.isclose(direct["miou"], a["miou"], abs_tol=1e-9)
    assert "mIoU" in capsys.readouterr().out


def test_evaluate_pred_rejects_unknown_values_and_model_flags(finetuned, tmp_path):
    from affmae.data.io import ImageError

    _, data = finetuned
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in sorted((data / "masks").glob("*.png")):
        Image.fromarray(np.asarray(Image.open(f))).save(pred / f.name)
    bad = pred / sorted(p.name for p in pred.iterdir())[0]
    arr = np.asarray(Image.open(bad)).copy()
    arr[0, 0] = 7
    Image.fromarray(arr).save(bad)
    with pytest.raises(ImageError, match=rf"{bad.name}.*\[7\]"):
        _evaluate(["--pred", str(pred), "--data", str(data)])
    with pytest.raises(ValueError, match="--window"):
        _evaluate(["--pred", str(pred), "--data", str(data), "--window", "32"])
