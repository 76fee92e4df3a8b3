"""``affmae predict`` and ``affmae evaluate``: masks for images of any size, and their IoU.

    affmae predict  --checkpoint CKPT --images DIR --out DIR [--overlay] [--window H [W]]
    affmae evaluate --checkpoint CKPT --data DIR [--out metrics.json]
    affmae evaluate --pred DIR --data DIR [--class-values V ...] [--out metrics.json]

A fine-tuned checkpoint (``affmae finetune``: ``best.pt``, ``latest.pt``, ``best.safetensors``,
``model.safetensors``) carries the model, the normalisation (``data_stats``) and, under
``extra.segmentation``, the class map (class index -> mask value, names) and the training crop
size, which is the default sliding window.

Inference on any image size (``sliding_window_logits``), issue 5:
1. Pad H and W up to a multiple of the patch size (reflection; the padding is cropped off the
   output). An image no larger than the window is predicted in one forward pass.
2. Otherwise windows of the training size are laid on the padded image with stride
   ``window * (1 - overlap)`` rounded down to a multiple of the patch (so every window sees the
   same patch grid alignment as the image), the last window flush with the far border.
3. Each window's logits are weighted by a separable trapezoid: 1 inside, a linear ramp over the
   overlap width only on sides that have a neighbouring window (image borders are not faded), and
   accumulated; dividing by the summed weights cross-fades the seams. A pixel seen by one window
   only gets exactly that window's logits. The ramp never reaches 0, so weights are positive
   everywhere.
Deliberate note: AFF's decoder queries carry absolute position embeddings and its clustering sees
the whole token set, so a window's logits depend on where the window starts and on what else is
in it: sliding-window and whole-image predictions agree only approximately (tests check the
blending exactly with a translation-equivariant stand-in, and the real model loosely).

Masks are written as PNG with the ORIGINAL mask values (uint8 when all values fit, else 16-bit),
one file per image page: ``OUT/<relative path>.png``, pages of a stack as
``<stem>_p0000.png``...; overlays (``--overlay``) go to ``OUT/overlays/``: the image in grey with
every class but index 0 (usually background) tinted.

Evaluation uses ``metrics.IoUMeter`` (dataset-level IoU, absent classes NaN and excluded from
the mean; see ``affmae.train.metrics``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from affmae.devices import resolve_device
from affmae.train.metrics import IoUMeter, json_safe

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Distinct colours (RGB 0-255) for classes 0, 1, ...; class 0 is never tinted in overlays.
PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195),
], dtype=np.uint8)
OVERLAY_ALPHA = 0.45
INFERENCE_DEFAULTS = {"overlap": 0.5, "batch_size": 4, "device": "auto", "precision": "fp32"}


# ----------------------------------------------------------------------------------------------
# Fine-tuned checkpoints
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentationInfo:
    """What a fine-tuned checkpoint says about its inputs and outputs."""

    class_values: tuple[int, ...]  # mask value of each class index
    class_names: tuple[str, ...]
    window: tuple[int, int] | None  # training crop (H, W): the default sliding window
    mean: float  # data_stats used to normalise the training images
    std: float

    def to_dict(self) -> dict:
        """The ``extra.segmentation`` entry of a checkpoint (no mean/std: those are data_stats)."""
        return {"class_values": list(self.class_values), "class_names": list(self.class_names),
                "window": list(self.window) if self.window else None}


def load_segmenter(path: str | os.PathLike,
                   map_location: str | torch.device = "cpu") -> tuple[nn.Module, SegmentationInfo]:
    """A fine-tuned segmentation model (eval mode) and its ``SegmentationInfo``.

    Older or hand-made checkpoints without ``extra.segmentation`` get class values 0..C-1,
    the names of the model config, and no window (whole-image inference).
    """
    from affmae.models.registry import create_model, read_checkpoint

    ckpt = read_checkpoint(path, map_location)
    if ckpt["model_name"] != "segmenter":
        raise ValueError(f"{path} holds a {ckpt['model_name']!r} model, not a fine-tuned "
                         "segmenter; fine-tune it first with `affmae finetune --checkpoint`")
    model = create_model("segmenter", **ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    stats = ckpt.get("data_stats")
    if not stats:
        raise ValueError(f"{path} has no data_stats (mean/std); cannot normalise images for it")
    seg = (ckpt.get("extra") or {}).get("segmentation") or {}
    C = model.num_classes
    values = tuple(int(v) for v in seg.get("class_values") or range(C))
    names = tuple(seg.get("class_names") or model.config.class_names or map(str, values))
    if len(values) != C or len(names) != C:
        raise ValueError(f"{path}: class map {values} / names {names} do not match the model's "
                         f"{C} classes")
    window = tuple(int(v) for v in seg["window"]) if seg.get("window") else None
    info = SegmentationInfo(values, names, window, float(stats["mean"]), float(stats["std"]))
    return model, info


# ----------------------------------------------------------------------------------------------
# Sliding-window inference
# ----------------------------------------------------------------------------------------------

def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (..., H, W) at the bottom/right to multiples of ``multiple`` (reflection when the
    image is large enough for it, else edge replication)."""
    H, W = x.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < H and pw < W else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: 0, stride, 2 * stride, ... and the last flush with the end."""
    if size <= window:
        return [0]
    return list(range(0, size - window, stride)) + [size - window]


def axis_weights(size: int, window: int, start: int, ramp: int) -> torch.Tensor:
    """(window,) blending weights of the window at ``start``: 1, with a linear ramp (values
    (i + 0.5) / ramp, never 0) over ``ramp`` pixels on a side that has a neighbouring window."""
    w = torch.ones(window, dtype=torch.float32)
    ramp = min(ramp, window)
    if ramp <= 0:
        return w
    up = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
    if start > 0:
        w[:ramp] = torch.minimum(w[:ramp], up)
    if start + window < size:
        w[-ramp:] = torch.minimum(w[-ramp:], up.flip(0))
    return w


@torch.no_grad()
def sliding_window_logits(model: nn.Module, images: torch.Tensor,
                          window: Sequence[int] | None = None, overlap: float = 0.5,
                          batch_size: int = 4, patch_size: int | None = None) -> torch.Tensor:
    """Per-pixel logits of images of any size (see the module docstring for the method).

    Args:
        model: ``(B, 1, h, w) -> (B, C, h, w)`` for h, w multiples of the patch.
        images: (B, 1, H, W) normalised, any H, W.
        window: (h, w) multiples of the patch; None = always the whole image.
        overlap: fraction of the window shared by neighbours, in [0, 1).
        batch_size: windows per forward pass (times B images).
        patch_size: defaults to ``model.patch_size``.
    Returns:
        (B, C, H, W) float32 logits.
    """
    P = int(patch_size or model.patch_size)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    B, _, H, W = images.shape
    x = pad_to_multiple(images, P)
    Hp, Wp = x.shape[-2:]
    if window is None or (Hp <= window[0] and Wp <= window[1]):
        return model(x).float()[..., :H, :W]
    wh, ww = int(window[0]), int(window[1])
    if wh <= 0 or ww <= 0 or wh % P or ww % P:
        raise ValueError(f"window {tuple(window)} must be positive multiples of the patch size {P}")
    wh, ww = min(wh, Hp), min(ww, Wp)
    sh = max(P, int(wh * (1.0 - overlap)) // P * P)
    sw = max(P, int(ww * (1.0 - overlap)) // P * P)
    ys, xs = window_starts(Hp, wh, sh), window_starts(Wp, ww, sw)
    wy = [axis_weights(Hp, wh, y0, wh - sh).to(x.device) for y0 in ys]
    wx = [axis_weights(Wp, ww, x0, ww - sw).to(x.device) for x0 in xs]
    boxes = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    out: torch.Tensor | None = None
    norm = torch.zeros(Hp, Wp, device=x.device)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first:first + batch_size]
        crops = torch.stack([x[:, :, ys[iy]:ys[iy] + wh, xs[ix]:xs[ix] + ww]
                             for iy, ix in chunk], dim=1)  # (B, k, 1, wh, ww)
        logits = model(crops.flatten(0, 1)).float()  # (B*k, C, wh, ww)
        logits = logits.unflatten(0, (B, len(chunk)))  # (B, k, C, wh, ww)
        if out is None:
            out = torch.zeros(B, logits.shape[2], Hp, Wp, device=x.device)
        for j, (iy, ix) in enumerate(chunk):
            weight = wy[iy][:, None] * wx[ix][None, :]  # (wh, ww)
            y0, x0 = ys[iy], xs[ix]
            out[:, :, y0:y0 + wh, x0:x0 + ww] += logits[:, j] * weight
            norm[y0:y0 + wh, x0:x0 + ww] += weight
    return (out / norm)[..., :H, :W]


def autocast_for(device: torch.device, precision: str):
    """An autocast context for ``precision`` (fp32 = none)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[precision])


# ----------------------------------------------------------------------------------------------
# Labelled pairs at full size (evaluation)
# ----------------------------------------------------------------------------------------------

def full_pair(dataset, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ``i`` of a ``SegmentationFolder`` uncropped: ((1, H, W) normalised, (H, W) classes)."""
    from affmae.data.io import read_image, read_mask

    pair = dataset.pairs[i]
    x = torch.from_numpy(read_image(pair.image, page=pair.page))  # (1, H, W)
    y = torch.from_numpy(dataset.to_classes(read_mask(pair.mask, page=pair.page)))
    return (x - dataset.mean) / dataset.std, y.long()


def score_pairs(model: nn.Module, dataset, indices: Sequence[int], meter: IoUMeter,
                device: torch.device, window: Sequence[int] | None, overlap: float = 0.5,
                batch_size: int = 4, progress: bool = False) -> None:
    """Predict each full-size pair (sliding window) and add it to ``meter``. The caller sets
    eval mode, no_grad and autocast."""
    from tqdm.auto import tqdm

    for i in tqdm(indices, desc="evaluate", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True):
        img, tgt = full_pair(dataset, int(i))
        logits = sliding_window_logits(model, img[None].to(device), window, overlap, batch_size)
        meter.update(logits.argmax(1)[0], tgt.to(device))


def open_labelled(data: str | os.PathLike, class_values: Sequence[int] | None, patch: int,
                  mean: float | None = None, std: float | None = None):
    """A ``SegmentationFolder`` used only to list and check pairs (any image size accepted):
    missing partners, shape mismatches and mask values outside ``class_values`` raise errors
    naming the file."""
    from affmae.data.datasets import SegmentationFolder

    return SegmentationFolder(data, (patch, patch), patch_size=patch, mode="resize",
                              class_values=class_values, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------
# Writing masks and overlays
# ----------------------------------------------------------------------------------------------

def output_name(rel: Path, page: int, pages: int) -> Path:
    """Relative output path of one page: ``a/b.png``, or ``a/b_p0003.png`` for stacks."""
    stem = rel.with_suffix("")
    return stem.parent / (f"{stem.name}_p{page:04d}.png" if pages > 1 else f"{stem.name}.png")


def values_lut(class_values: Sequence[int]) -> np.ndarray:
    """Class index -> mask value array of the smallest PNG dtype that holds them."""
    vals = np.asarray(class_values, dtype=np.int64)
    if vals.min() < 0 or vals.max() > 65535:
        raise ValueError(f"class values {list(class_values)} cannot be written to PNG "
                         "(need 0..65535)")
    return vals.astype(np.uint8 if vals.max() <= 255 else np.uint16)


def write_mask(path: Path, classes: np.ndarray, lut: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(lut[classes]).save(path)


def display_gray(image: np.ndarray) -> np.ndarray:
    """(H, W) float -> uint8 for display, stretched between the 1st and 99th percentile."""
    lo, hi = np.percentile(image, [1, 99])
    scaled = (image - lo) / max(hi - lo, 1e-8)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(H, W) float image + (H, W) class indices -> (H, W, 3) uint8, classes >= 1 tinted."""
    gray = display_gray(image).astype(np.float32)[..., None].repeat(3, axis=-1)
    colours = PALETTE[classes % len(PALETTE)].astype(np.float32)
    tint = (classes > 0)[..., None] * OVERLAY_ALPHA
    return (gray * (1 - tint) + colours * tint).round().astype(np.uint8)


def save_prediction_figure(path: str | os.PathLike, images: Sequence[np.ndarray],
                           targets: Sequence[np.ndarray], preds: Sequence[np.ndarray],
                           class_names: Sequence[str], title: str = "") -> None:
    """Rows of image | target | prediction (classes in ``PALETTE`` colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for r in range(n):
        panels = [display_gray(images[r]), PALETTE[targets[r] % len(PALETTE)],
                  PALETTE[preds[r] % len(PALETTE)]]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            ax.imshow(panel, cmap="gray" if c == 0 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("image", "target", "prediction")[c])
    handles = [Patch(color=PALETTE[i % len(PALETTE)] / 255, label=name)
               for i, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------

def _window(arg: Sequence[int] | None, info: SegmentationInfo) -> tuple[int, int] | None:
    """--window: absent = the checkpoint's training size; 0 = whole image; H [W]."""
    if arg is None:
        return info.window
    if len(arg) not in (1, 2) or any(v < 0 for v in arg):
        raise ValueError(f"--window takes 0, one size or H W, got {list(arg)}")
    if arg[0] == 0:
        return None
    return (arg[0], arg[0]) if len(arg) == 1 else (arg[0], arg[1])


def predict_folder(checkpoint: str | os.PathLike, images: str | os.PathLike,
                   out: str | os.PathLike, overlay_images: bool = False,
                   window: Sequence[int] | None = None, overlap: float = 0.5,
                   batch_size: int = 4, device: str = "auto", precision: str = "fp32",
                   progress: bool = True) -> list[Path]:
    """Segment every image (page) under ``images``; returns the written mask paths."""
    from PIL import Image
    from tqdm.auto import tqdm

    from affmae.data.datasets import scan_images
    from affmae.data.io import read_image

    dev = resolve_device(device)
    model, info = load_segmenter(checkpoint, dev)
    win = _window(window, info)
    lut = values_lut(info.class_values)
    root, out = Path(images), Path(out)
    items = scan_images(root)
    pages: dict[Path, int] = {}
    for path, page in items:
        pages[path] = max(pages.get(path, 0), page + 1)
    names = {}
    for path, page in items:
        name = output_name(path.relative_to(root), page, pages[path])
        if name in names:
            raise ValueError(f"{path} and {names[name][0]} would both be written to {out / name}; "
                             "rename one of them")
        names[name] = (path, page)
    written = []
    with autocast_for(dev, precision):
        for name, (path, page) in tqdm(names.items(), desc="predict", disable=not progress,
                                       file=sys.stderr, dynamic_ncols=True):
            raw = read_image(path, page=page)[0]  # (H, W)
            x = (torch.from_numpy(raw) - info.mean) / info.std
            logits = sliding_window_logits(model, x[None, None].to(dev), win, overlap, batch_size)
            classes = logits.argmax(1)[0].cpu().numpy()
            write_mask(out / name, classes, lut)
            written.append(out / name)
            if overlay_images:
                target = out / "overlays" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(overlay(raw, classes)).save(target)
    return written


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike,
                        window: Sequence[int] | None = None, overlap: float = 0.5,
                        batch_size: int = 4, device: str = "auto", precision: str = "fp32",
                        progress: bool = True) -> dict:
    """mIoU and per-class IoU of a fine-tuned checkpoint on the labelled pairs of ``data``."""
    dev = resolve_device(device)
    model, info = load_segmenter(checkpoint, dev)
    ds = open_labelled(data, info.class_values, model.patch_size, info.mean, info.std)
    meter = IoUMeter(len(info.class_values), info.class_names, dev)
    with torch.no_grad(), autocast_for(dev, precision):
        score_pairs(model, ds, range(len(ds)), meter, dev, _window(window, info), overlap,
                    batch_size, progress)
    return _report(meter, info.class_values, info.class_names, len(ds))


def evaluate_predictions(pred: str | os.PathLike, data: str | os.PathLike,
                         class_values: Sequence[int] | None = None) -> dict:
    """Score a folder of predicted masks (named as ``affmae predict`` writes them, values = mask
    values) against the labelled pairs of ``data``."""
    from affmae.data.io import ImageError, read_mask

    ds = open_labelled(data, class_values, 1, mean=0.0, std=1.0)
    pred_root, img_root = Path(pred), ds.root / "images"
    pages: dict[Path, int] = {}
    for p in ds.pairs:
        pages[p.image] = max(pages.get(p.image, 0), p.page + 1)
    allowed = np.asarray(ds.class_values)
    meter = IoUMeter(ds.num_classes, ds.class_names)
    for p in ds.pairs:
        rel = output_name(p.image.relative_to(img_root), p.page, pages[p.image])
        f = pred_root / rel
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no predicted mask for {p.image} (page {p.page})")
        m = read_mask(f)
        target = ds.to_classes(read_mask(p.mask, page=p.page))
        if m.shape != target.shape:
            raise ImageError(f, f"predicted mask is {m.shape} (H, W) but the label {p.mask} is "
                             f"{target.shape}")
        bad = sorted(set(np.unique(m).tolist()) - set(allowed.tolist()))
        if bad:
            raise ImageError(f, f"predicted mask values {bad} are not in class_values "
                             f"{ds.class_values}")
        meter.update(torch.from_numpy(ds.to_classes(m)), torch.from_numpy(target))
    return _report(meter, ds.class_values, ds.class_names, len(ds.pairs))


def _report(meter: IoUMeter, values, names, n: int) -> dict:
    scores = meter.compute()
    return {"miou": scores["miou"],
            "per_class": {name: scores[k] for name, k in zip(names, meter.keys)},
            "class_values": list(values), "class_names": list(names), "images": n,
            "confusion_matrix": meter.confmat.tolist()}


def format_report(report: dict) -> str:
    """A small table: class, value, IoU; then mIoU (absent classes shown as n/a)."""
    fmt = lambda v: "n/a (absent)" if v is None or math.isnan(v) else f"{v:.4f}"  # noqa: E731
    lines = [f"{'class':<20} {'value':>6}  IoU"]
    for (name, iou), value in zip(report["per_class"].items(), report["class_values"]):
        lines.append(f"{name:<20} {value:>6}  {fmt(iou)}")
    lines.append(f"{'mIoU':<20} {'':>6}  {fmt(report['miou'])}  ({report['images']} image(s))")
    return "\n".join(lines)


def _write_json(report: dict, path: str | os.PathLike) -> None:
    out = dict(report, miou=json_safe({"m": report["miou"]})["m"],
               per_class=json_safe(report["per_class"]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _inference_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("inference")
    g.add_argument("--window", type=int, nargs="+", metavar="PX", default=argparse.SUPPRESS,
                   help="sliding-window size: H [W], multiples of the patch; 0 = always the whole "
                   "image (default: the checkpoint's training size)")
    g.add_argument("--overlap", type=float, default=argparse.SUPPRESS,
                   help="fraction of a window shared with its neighbour, in [0, 1) "
                   f"(default: {INFERENCE_DEFAULTS['overlap']})")
    g.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                   help="windows per forward pass "
                   f"(default: {INFERENCE_DEFAULTS['batch_size']})")
    g.add_argument("--device", default=argparse.SUPPRESS,
                   help=f"auto | cpu | cuda | cuda:N (default: {INFERENCE_DEFAULTS['device']})")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=argparse.SUPPRESS,
                   help=f"autocast dtype of the forward pass (default: "
                   f"{INFERENCE_DEFAULTS['precision']})")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar")


def _inference_args(args: argparse.Namespace) -> dict:
    """The inference flags with their defaults filled in (absent from ``args`` unless typed, so
    that ``evaluate --pred``, which runs no model, can reject them instead of ignoring them)."""
    return {k: getattr(args, k, v) for k, v in INFERENCE_DEFAULTS.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``affmae predict``."""
    parser.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS, metavar="CKPT",
                        help="fine-tuned checkpoint (.pt or .safetensors from affmae finetune)")
    parser.add_argument("--images", required=True, default=argparse.SUPPRESS, metavar="DIR",
                        help="folder of images (searched recursively; PNG/JPEG/TIFF, any size)")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS, metavar="DIR",
                        help="output folder for the masks (PNG, original mask values)")
    parser.add_argument("--overlay", action="store_true",
                        help="also write colour overlays to OUT/overlays/")
    _inference_flags(parser)


def run(args: argparse.Namespace) -> int:
    inf = _inference_args(args)
    written = predict_folder(args.checkpoint, args.images, args.out, args.overlay,
                             getattr(args, "window", None), inf["overlap"], inf["batch_size"],
                             inf["device"], inf["precision"], args.progress)
    print(f"[affmae] wrote {len(written)} mask(s) to {args.out}", file=sys.stderr)
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``affmae evaluate``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", default=argparse.SUPPRESS,
                     help="fine-tuned checkpoint to run on the images of --data")
    src.add_argument("--pred", metavar="DIR", default=argparse.SUPPRESS,
                     help="folder of predicted masks named as `affmae predict` writes them")
    parser.add_argument("--data", required=True, default=argparse.SUPPRESS, metavar="DIR",
                        help="labelled folder with images/ and masks/ (and classes.yaml)")
    parser.add_argument("--class-values", type=int, nargs="+", metavar="V",
                        default=argparse.SUPPRESS,
                        help="with --pred: mask values in class order (default: classes.yaml, "
                        "else the values found in the masks); a checkpoint has its own")
    parser.add_argument("--out", metavar="JSON", default=argparse.SUPPRESS,
                        help="also write the scores to this JSON file (absent classes: null)")
    _inference_flags(parser)


def run_evaluate(args: argparse.Namespace) -> int:
    if getattr(args, "checkpoint", None) is not None:
        if hasattr(args, "class_values"):
            raise ValueError("--class-values goes with --pred; a checkpoint has its own class map")
        inf = _inference_args(args)
        report = evaluate_checkpoint(args.checkpoint, args.data, getattr(args, "window", None),
                                     inf["overlap"], inf["batch_size"], inf["device"],
                                     inf["precision"], args.progress)
    else:
        given = [f"--{k.replace('_', '-')}" for k in ("window", *INFERENCE_DEFAULTS)
                 if hasattr(args, k)]
        if given:
            raise ValueError(f"{', '.join(given)}: model option(s), valid only with "
                             "--checkpoint (--pred scores masks that are already predicted)")
        report = evaluate_predictions(args.pred, args.data, getattr(args, "class_values", None))
    print(format_report(report))
    if getattr(args, "out", None):
        _write_json(report, args.out)
    return 0
