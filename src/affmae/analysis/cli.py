"""``affmae analyze``: the figures that show what a pretrained model learned (issue 6).

    affmae analyze --checkpoint CKPT --data DIR --out DIR [--size PX [PX]] [--num-images N] ...
    affmae analyze --compare RUN_A/analysis.json RUN_B/analysis.json --labels A B --out DIR

With a checkpoint (AFFMAE or ViTMAE, ``.pt`` or ``.safetensors``) it writes, under ``--out``:
effective ranks per encoder stage (paper Fig. 5), PCA of dense decoder features (Fig. 4), token
maps (Fig. 3), reconstructions for each mask kind and ratio (Fig. 8)
(``affmae.analysis.model_figures``), and always the mask spectra and mask illustration
(Figs. 6-7, ``affmae.analysis.figures.mask_spectra_figure``), which need no model: without
``--checkpoint`` only those are made. All numbers go to ``analysis.json``. ``--compare`` puts
the effective ranks of earlier runs side by side (e.g. with and without deep supervision).

Defaults follow the checkpoint: a ``.pt`` training checkpoint carries its job config, so
``--size``, ``--crop``, ``--mask-ratio``, ``--mask-kind`` and ``--perlin-scales`` default to the
pretraining values (else 512 px, resize, 0.5, perlin, 2 4 8). Images are normalised with the
checkpoint's ``data_stats`` (computed from ``--data`` when it has none, and said so). The images
used are a ``--seed``-ed random subset of the folder; every mask is seeded too, so a run is
repeatable and two checkpoints analysed with the same flags see the same images and masks.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from affmae.devices import resolve_device
from affmae.ops.masking import DEFAULT_PERLIN_SCALES, MASK_KINDS

DEFAULT_SIZE = 512
CROPS = ("resize", "center_crop")
# Flags whose default depends on the checkpoint: absent from the namespace unless given (so -h
# shows the help text's default, not "None"); ``run`` reads them as None.
_OPTIONAL = ("checkpoint", "data", "compare", "labels", "size", "crop", "spectrum_images",
             "patch_size", "mask_ratio", "mask_kind", "perlin_scales")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``affmae analyze``."""
    io = parser.add_argument_group("input/output")
    io.add_argument("--checkpoint", metavar="CKPT", default=argparse.SUPPRESS,
                    help="pretrained AFFMAE/ViTMAE (.pt or .safetensors); without it only the "
                    "mask spectra (Figs. 6-7) are computed")
    io.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS,
                    help="folder of images (searched recursively); required except with "
                    "--compare")
    io.add_argument("--out", metavar="DIR", required=True, default=argparse.SUPPRESS,
                    help="output folder for the PNG figures and analysis.json")
    io.add_argument("--compare", nargs="+", metavar="JSON", default=argparse.SUPPRESS,
                    help="instead of analysing a checkpoint: put the effective ranks of two or "
                    "more earlier runs' analysis.json side by side (effective_rank_compare.png "
                    "and compare.json in --out), e.g. with and without deep supervision")
    io.add_argument("--labels", nargs="+", metavar="NAME", default=argparse.SUPPRESS,
                    help="one legend name per --compare file (default: each file's folder name)")
    io.add_argument("--skip-bad", action="store_true",
                    help="skip unreadable images instead of stopping with an error naming the file")
    d = parser.add_argument_group("images")
    d.add_argument("--size", type=int, nargs="+", metavar="PX", default=argparse.SUPPRESS,
                   help="image size: one int (square) or H W, a multiple of the patch size "
                   f"(default: the checkpoint's training size, else {DEFAULT_SIZE})")
    d.add_argument("--crop", choices=CROPS, default=argparse.SUPPRESS,
                   help="how an image becomes SIZE (default: the checkpoint's, else resize)")
    d.add_argument("--num-images", type=int, default=16, metavar="N",
                   help="images for effective ranks and reconstruction errors")
    d.add_argument("--show", type=int, default=4, metavar="N",
                   help="images drawn in each figure (the first N of those analysed)")
    d.add_argument("--spectrum-images", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="images whose power spectra are averaged (default: --num-images; "
                   "the paper used 640)")
    d.add_argument("--patch-size", type=int, default=argparse.SUPPRESS, metavar="P",
                   help="patch size of the masks without a checkpoint (default 8); with one it "
                   "is the model's and this flag must match or be left out")
    m = parser.add_argument_group("masking")
    m.add_argument("--mask-ratio", type=float, default=argparse.SUPPRESS, metavar="R",
                   help="ratio of the pretraining-style mask (masked ranks, token maps, "
                   "spectra; default: the checkpoint's, else 0.5)")
    m.add_argument("--mask-kind", choices=MASK_KINDS, default=argparse.SUPPRESS,
                   help="kind of that mask (default: the checkpoint's, else perlin)")
    m.add_argument("--perlin-scales", type=float, nargs="+", default=argparse.SUPPRESS, metavar="S",
                   help="Perlin lattice scales in patches (default: the checkpoint's, else "
                   + " ".join(str(s) for s in DEFAULT_PERLIN_SCALES) + ")")
    m.add_argument("--recon-ratios", type=float, nargs="+", default=[0.5, 0.75], metavar="R",
                   help="mask ratios of the reconstruction figures")
    m.add_argument("--recon-kinds", choices=MASK_KINDS, nargs="+", default=list(MASK_KINDS),
                   help="mask kinds of the reconstruction figures")
    m.add_argument("--num-masks", type=int, default=64, metavar="N",
                   help="masks of each kind whose power spectra are averaged")
    r = parser.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass")
    r.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (cuda if available), cuda, cuda:N, cpu")
    r.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype of the forward passes (numbers are computed in float64)")
    r.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the image subset and every mask")


def _say(msg: str) -> None:
    print(f"affmae analyze: {msg}", flush=True)


def _training_config(path: Path) -> dict:
    """The job config stored in a ``.pt`` training checkpoint ({} for .safetensors or none)."""
    if path.suffix == ".safetensors":
        return {}
    try:  # mmap: only the small config entry is actually read
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # load_model has already reported unreadable files
        return {}
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    return dict(cfg) if isinstance(cfg, dict) else {}


def _size(value, default) -> tuple[int, int]:
    size = value if value is not None else default
    if isinstance(size, int):
        size = [size]
    size = [int(s) for s in size]
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"--size must be one positive int or H W, got {size}")
    return size[0], size[1]


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_images", "show", "num_masks", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.spectrum_images is not None and args.spectrum_images < 1:
        raise ValueError(f"--spectrum-images must be >= 1, got {args.spectrum_images}")
    bad = [r for r in args.recon_ratios if not 0.0 < r < 1.0]
    if bad:
        raise ValueError(f"--recon-ratios must be in (0, 1), got {bad}")
    if args.mask_ratio is not None and not 0.0 < args.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if args.perlin_scales is not None and any(not s > 0 for s in args.perlin_scales):
        raise ValueError(f"--perlin-scales must be positive, got {args.perlin_scales}")


def _load_images(root: str, size, patch: int, crop: str, mean, std, n: int, seed: int,
                 skip_bad: bool):
    """A seeded random subset of n (file, page) items -> ((n, 1, H, W) normalised images, mean,
    std, their names "path" or "path#page")."""
    from affmae.data.datasets import ImageFolder

    ds = ImageFolder(root, size, patch_size=patch, mode=crop, mean=mean, std=std,
                     skip_bad=skip_bad, seed=seed)
    if len(ds) < n:
        _say(f"{root} has {len(ds)} images, fewer than the {n} asked for: using all")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    _say(f"reading {len(order)} of {len(ds)} images from {root} at {size[0]}x{size[1]} ({crop})")
    images = torch.stack([ds[i] for i in order])  # (n, 1, H, W)
    names = [f"{ds.items[i][0]}" + (f"#{ds.items[i][1]}" if ds.items[i][1] else "") for i in order]
    return images, ds.mean, ds.std, names


def run(args: argparse.Namespace) -> int:
    from affmae import __version__
    from affmae.analysis.figures import mask_spectra_figure

    t0 = time.time()
    args = argparse.Namespace(**{**dict.fromkeys(_OPTIONAL), **vars(args)})
    if args.compare is not None:
        return compare_runs(args.compare, args.labels, Path(args.out))
    if args.labels is not None:
        raise ValueError("--labels names the --compare files; give --compare too")
    if args.data is None:
        raise ValueError("--data is required (a folder of images), except with --compare")
    _check_args(args)
    out = Path(args.out)
    device = resolve_device(args.device)

    # 1. Model (optional) and the settings it implies.
    model, train_cfg, stats = None, {}, None
    if args.checkpoint is None:
        _say("no --checkpoint: only the mask spectra and mask illustration (Figs. 6-7) are made")
        patch = 8 if args.patch_size is None else int(args.patch_size)
        if patch < 1:
            raise ValueError(f"--patch-size must be >= 1, got {patch}")
    else:
        from affmae.analysis.model_figures import model_family
        from affmae.models.registry import load_model

        ckpt = Path(args.checkpoint)
        _say(f"loading {ckpt}")
        model = load_model(ckpt)
        family = model_family(model)
        patch = int(model.patch_size)
        if args.patch_size is not None and int(args.patch_size) != patch:
            raise ValueError(f"--patch-size {args.patch_size} differs from the checkpoint's "
                             f"patch size {patch}; leave it out")
        train_cfg = _training_config(ckpt)
        stats = getattr(model, "data_stats", None)
        _say(f"{model.model_name} ({family}), patch {patch}"
             + (f", trained at {train_cfg['size']}" if "size" in train_cfg else ""))
    H, W = _size(args.size, train_cfg.get("size", DEFAULT_SIZE))
    if H % patch or W % patch:
        whose = "--patch-size" if model is None else f"{model.model_name}'s patch size"
        raise ValueError(f"--size {H}x{W} is not a multiple of {whose} {patch} "
                         f"(try {max(patch, H // patch * patch)}x{max(patch, W // patch * patch)})")
    crop = args.crop or (train_cfg.get("crop") if train_cfg.get("crop") in CROPS else "resize")
    ratio = args.mask_ratio
    if ratio is None:
        ratio = float(train_cfg.get("mask_ratio", 0.5))
    if not 0.0 < ratio < 1.0:  # a checkpoint trained without masking has nothing to compare
        raise ValueError(f"mask ratio {ratio} (from the checkpoint) must be in (0, 1); "
                         "pass --mask-ratio")
    kind = args.mask_kind or train_cfg.get("mask_kind", "perlin")
    scales = tuple(args.perlin_scales or train_cfg.get("perlin_scales", DEFAULT_PERLIN_SCALES))
    n_spec = args.spectrum_images or args.num_images
    n_model = args.num_images if model is not None else 0

    # 2. Images: one seeded subset; the model uses its first --num-images, the spectra its first
    #    --spectrum-images.
    mean = std = None
    if model is None:
        mean, std = 0.0, 1.0  # spectra are of min-max rescaled images: no statistics needed
    elif stats and "mean" in stats and "std" in stats:
        mean, std = float(stats["mean"]), float(stats["std"])
    images, mean, std, names = _load_images(args.data, (H, W), patch, crop, mean, std,
                                            max(n_model, n_spec), args.seed, args.skip_bad)
    stats_source = "none (spectra only)" if model is None else (
        "checkpoint" if stats else f"computed from {args.data}")
    if model is not None and not stats:
        _say(f"checkpoint has no data_stats: normalising with statistics of {args.data} "
             f"(mean {mean:.4f}, std {std:.4f})")

    result: dict = {
        "checkpoint": None if model is None else str(args.checkpoint),
        "model_name": None if model is None else model.model_name,
        "model_family": None if model is None else family,
        "data": str(args.data),
        "images": names,
        "size": [H, W],
        "patch_size": patch,
        "grid_hw": [H // patch, W // patch],
        "crop": crop,
        "data_stats": {"mean": mean, "std": std, "source": stats_source},
        "seed": args.seed,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "precision": args.precision,
        "versions": {"affmae": __version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }

    # 3. Model figures.
    files: dict[str, str] = {}
    if model is not None:
        from affmae.analysis.model_figures import analyze_model

        res = analyze_model(
            model, images[:n_model], out, mean, std, mask_ratio=ratio, mask_kind=kind,
            perlin_scales=scales, recon_ratios=args.recon_ratios, recon_kinds=args.recon_kinds,
            show=args.show, batch_size=args.batch_size, seed=args.seed, device=device,
            precision=args.precision, log=_say)
        files.update(res.pop("files"))
        result.update(res)
        er = res["effective_rank"]
        for mode in ("unmasked", "masked"):
            _say(f"effective rank ({mode}): " + ", ".join(
                f"{lab} {v:.3f}" for lab, v in zip(er["layers"], er[mode])))

    # 4. Spectra (no model needed).
    _say(f"power spectra of {min(n_spec, images.shape[0])} images and {args.num_masks} masks of "
         "each kind")
    spec_imgs = (images[:n_spec, 0].double() * std + mean).numpy()  # (n, H, W) dataset units
    spectra = mask_spectra_figure(spec_imgs, (H // patch, W // patch), patch, out, ratio=ratio,
                                  n=args.num_masks, seed=args.seed, scales=scales)
    files.update({f"mask_{k}" if k == "spectra" else k: v
                  for k, v in spectra.pop("files").items()})
    result["spectra"] = spectra
    _say("spectral slopes: " + ", ".join(
        f"{k} {v:.2f}" for k, v in spectra["slopes"].items() if v is not None))

    result["files"] = files
    result["seconds"] = round(time.time() - t0, 2)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "analysis.json"
    with open(json_path, "w") as f:
        json.dump(_jsonable(result), f, indent=2)
    _say(f"wrote {len(files)} figures and {json_path} in {result['seconds']:.1f} s")
    return 0


def compare_runs(paths: list[str], labels: list[str] | None, out: Path) -> int:
    """Effective ranks of several ``analysis.json`` files in one figure and one JSON table.

    The runs must have measured the same layers on the same number of images with the same mask
    (what ``affmae analyze`` does for checkpoints of one architecture given the same flags);
    anything else is an error naming the file, since the curves would not be comparable."""
    from affmae.analysis.figures import plot_effective_rank

    if len(paths) < 2:
        raise ValueError(f"--compare needs at least two analysis.json files, got {len(paths)}")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels gives {len(labels)} names for {len(paths)} --compare files")
    names = labels or [Path(p).resolve().parent.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"legend names must differ, got {names}; use --labels")
    runs = []
    for path in paths:
        try:
            er = json.loads(Path(path).read_text())["effective_rank"]
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such analysis.json") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an analysis.json with effective ranks ({e!r}); was it "
                             "written by `affmae analyze --checkpoint ...`?") from None
        runs.append(er)
    ref = runs[0]
    for path, er in zip(paths[1:], runs[1:]):
        for key in ("layers", "num_images", "mask"):
            if er.get(key) != ref.get(key):
                raise ValueError(f"{path}: {key} {er.get(key)!r} differs from {paths[0]}'s "
                                 f"{ref.get(key)!r}; analyse both with the same flags")
    # The figure shows the unmasked input (as fine-tuning sees it); the masked ranks, close to
    # them in every run so far, would crowd it and are in compare.json.
    curves = {name: er["unmasked"] for name, er in zip(names, runs)}
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_effective_rank(curves, ref["layers"], out / "effective_rank_compare.png",
                              title=f"Normalised effective rank, unmasked input, "
                              f"{ref['num_images']} images")
    table = {"layers": ref["layers"], "num_images": ref["num_images"], "mask": ref["mask"],
             "runs": {n: {"file": str(p), "unmasked": er["unmasked"], "masked": er["masked"]}
                      for n, p, er in zip(names, paths, runs)}}
    (out / "compare.json").write_text(json.dumps(_jsonable(table), indent=2) + "\n")
    for n, er in zip(names, runs):
        _say(f"{n}: effective rank (unmasked) " + ", ".join(
            f"{lab} {v:.3f}" for lab, v in zip(ref["layers"], er["unmasked"])))
    _say(f"wrote {fig} and {out / 'compare.json'}")
    return 0


def _jsonable(x):
    """numpy scalars/arrays and tuples -> plain JSON values; non-finite floats -> None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if np.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
