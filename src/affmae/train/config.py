"""Training configuration: dataclasses whose fields are both the YAML schema and the CLI flags.

Every field carries its help text in ``metadata["help"]`` (that text is the field's comment), so
``affmae <job> -h`` documents every flag without a second copy. Values are resolved in this
order: dataclass default < YAML file (``--config``) < command-line flag. Unknown YAML keys are an
error naming them. ``__post_init__`` normalises and validates; errors name the bad value.

``TrainConfig`` holds what every training job shares (the generic loop in ``loop.py`` reads only
these fields); ``PretrainConfig`` adds data, masking and model defaults for MAE pretraining
(paper sec. 4 "Pre-training"; DESIGN 5). Fine-tuning subclasses ``TrainConfig`` the same way.

Deviation from the paper: the default schedule length is 300 epochs and the default input
pipeline is ``resize`` (the paper's), but both are flags; the learning rate is absolute for the
effective batch (``batch_size * grad_accum``), never rescaled by batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T", bound="TrainConfig")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, group: str = "training",
        flag_type: Any = None, nargs: str | None = None, metavar: str | None = None) -> Any:
    """A config field: ``default``, its help text (the field's comment) and CLI hints.

    ``flag_type``/``nargs`` override what is inferred from the annotation (e.g. ``--size 512``
    or ``--size 512 768``); ``group`` names the ``-h`` section the flag is listed under.
    """
    meta = {"help": help, "group": group, "flag_type": flag_type, "nargs": nargs,
            "metavar": metavar}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _as_hw(value: Any, name: str) -> tuple[int, int]:
    """One int (square) or two ints (H, W) -> (H, W)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) in (1, 2) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])
    raise ValueError(f"{name} must be one int (square) or two ints (H, W), got {value!r}")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """Fields shared by every training job (read by the generic loop)."""

    # --- data -----------------------------------------------------------------------------
    data: str = opt(help="folder of training images (searched recursively)", group="data",
                    metavar="DIR")
    size: tuple[int, int] = opt(
        512, "training resolution: one int for square, or H W; a multiple of the model's patch "
        "size (8)", group="data", flag_type=int, nargs="+", metavar="PX")
    skip_bad: bool = opt(False, "skip unreadable/empty/odd image files (reporting how many) "
                         "instead of stopping with an error naming the file", group="data")
    num_workers: int = opt(4, "DataLoader worker processes per rank (0 = load in the main "
                           "process)", group="data")

    # --- model ----------------------------------------------------------------------------
    model: str = opt("aff_small", "registered model name (see affmae.list_models())",
                     group="model")
    model_overrides: dict = opt(
        {}, "model config fields to override, as a YAML/JSON mapping, e.g. "
        "'{drop_path: 0.0, downsample_rate: 0.25}' (misspelt fields are an error)", group="model",
        metavar="MAPPING")

    # --- optimisation ---------------------------------------------------------------------
    batch_size: int = opt(64, "GLOBAL images per micro-step, summed over all ranks; each rank "
                          "gets batch_size / world_size. Equal global batch gives matching loss "
                          "curves on 1 or N GPUs", group="optimisation")
    grad_accum: int = opt(4, "micro-steps accumulated per optimizer step; effective batch = "
                          "batch_size * grad_accum (paper: 64 x 4 = 256)", group="optimisation")
    steps: int | None = opt(None, "total optimizer steps (mutually exclusive with --epochs; "
                            "if neither is given: 300 epochs)", group="optimisation")
    epochs: int | None = opt(None, "total epochs (one epoch = len(dataset) // effective batch "
                             "optimizer steps; the remainder of each epoch is dropped)",
                             group="optimisation")
    lr: float = opt(5e-4, "peak learning rate, ABSOLUTE for the effective batch (no scaling by "
                    "batch size is applied; paper: 5e-4 at 256)", group="optimisation")
    warmup_steps: int = opt(10_000, "linear warmup length in optimizer steps (paper: 10,000)",
                            group="optimisation")
    min_lr: float = opt(1e-6, "learning rate at the end of the cosine decay",
                        group="optimisation")
    betas: tuple[float, float] = opt((0.883, 0.935), "AdamW betas (paper: 0.883 0.935)",
                                     group="optimisation", flag_type=float, nargs="2",
                                     metavar="BETA")
    weight_decay: float = opt(0.05, "AdamW weight decay; never applied to norms, biases, "
                              "other 1-D parameters or model.no_weight_decay() names",
                              group="optimisation")
    clip_grad: float = opt(5.0, "clip the global gradient norm to this value (0 = no clipping; "
                           "the norm is still logged)", group="optimisation")

    # --- precision and device -------------------------------------------------------------
    precision: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "autocast dtype; fp16 adds a GradScaler (its state is checkpointed)",
        group="device")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N. Under torchrun with CUDA every rank "
                      "uses cuda:LOCAL_RANK", group="device")
    ddp_find_unused: bool = opt(False, "DDP find_unused_parameters (only needed if some "
                                "parameters get no gradient in a step)", group="device")
    seed: int = opt(0, "seed of every random choice: data order, crops, masks, init, drop-path",
                    group="device")
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms: bitwise repeatable "
                              "GPU runs (slower; an op without a deterministic kernel raises). "
                              "CPU runs are repeatable without it", group="device")
    grad_sync: Literal["ddp", "allreduce"] = opt(
        "ddp", "how ranks average gradients under torchrun: ddp (DistributedDataParallel, "
        "the all-reduce overlapped with the backward) or allreduce (one bucketed all_reduce of "
        "every gradient after the last micro-step's backward; what a CUDA-graphed step under "
        "torchrun uses, whatever this says)", group="device")
    cuda_graph: bool | None = opt(
        None, "capture each micro-step's forward and backward (with the loss) in a CUDA graph "
        "and replay it: no Python or launch overhead (an eager aff_small pretraining step is "
        "host-bound, 155 vs 36 ms at 512 px on an H200, docs/BENCHMARKS.md). Unset: on for "
        "one CUDA process in bf16 or fp32, else off (the log says why); --cuda-graph insists "
        "(an error where it cannot run; under torchrun it then synchronises gradients with one "
        "all_reduce per step, not yet run on GPUs); --no-cuda-graph turns it off. Needs fixed "
        "batch shapes (every micro-batch has the same size)", group="device")

    # --- output, logging, checkpoints ------------------------------------------------------
    out: str = opt("runs/pretrain", "output folder: log.csv, figures/, latest.pt, "
                   "model.safetensors, config.yaml", group="output")
    log_every: int = opt(10, "write a log.csv row (averages since the previous row) every N "
                         "steps", group="output")
    ckpt_every: int = opt(1000, "overwrite latest.pt every N steps (and at the end)",
                          group="output")
    keep_every: int = opt(0, "also keep step_XXXXXXX.pt every N steps (0 = never)",
                          group="output")
    figure_every: int = opt(1000, "save a reconstruction figure every N steps and at the "
                            "end (0 = never)", group="output")
    resume: str | None = opt(None, "checkpoint to resume from, or 'auto' = OUT/latest.pt if it "
                             "exists (else start fresh)", group="output", metavar="PATH|auto")
    progress: bool = opt(True, "show a progress bar (rank 0)", group="output")

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data is required: pass --data DIR or set `data:` in the YAML")
        self.data = str(self.data)
        self.out = str(self.out)
        self.size = _as_hw(self.size, "size")
        if min(self.size) <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a mapping, got {self.model_overrides!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps ({self.steps}) or epochs ({self.epochs}), not both")
        if self.steps is None and self.epochs is None:
            self.epochs = 300
        for name in ("batch_size", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("warmup_steps", "keep_every", "figure_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, "
                             f"min_lr={self.min_lr}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError(f"weight_decay ({self.weight_decay}) and clip_grad "
                             f"({self.clip_grad}) must be >= 0")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, no tuples): YAML- and ``torch.load(weights_only=True)``-safe."""
        return _plain(dataclasses.asdict(self))


@dataclasses.dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """AFFMAE pretraining (DESIGN 2, 5): an unlabelled image folder -> an MAE checkpoint."""

    crop: Literal["resize", "random_crop", "center_crop"] = opt(
        "resize", "how an image becomes SIZE: resize (paper), random_crop (seeded; for images "
        "larger than SIZE), center_crop", group="data")
    mask_ratio: float = opt(0.5, "fraction of patches hidden, exact for every image "
                            "(paper: 0.5)", group="masking")
    mask_kind: Literal["perlin", "uniform"] = opt("perlin", "mask noise: perlin (paper) or "
                                                  "uniform", group="masking")
    perlin_scales: tuple[int, ...] = opt(
        (2, 4, 8), "Perlin lattice scales in patches (one is drawn per image)",
        group="masking", flag_type=int, nargs="+", metavar="S")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mask_kind not in ("perlin", "uniform"):
            raise ValueError(f"mask_kind must be perlin or uniform, got {self.mask_kind!r}")
        if self.crop not in ("resize", "random_crop", "center_crop"):
            raise ValueError(f"crop must be resize, random_crop or center_crop, got {self.crop!r}")
        self.perlin_scales = tuple(int(s) for s in self.perlin_scales)
        if not self.perlin_scales or min(self.perlin_scales) < 1:
            raise ValueError(f"perlin_scales must be >= 1, got {self.perlin_scales}")


# ----------------------------------------------------------------------------------------------
# YAML + flags
# ----------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _mapping(text: str) -> dict:
    value = yaml.safe_load(text) if text.strip() else {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{a: 1}}', got {text!r}")
    return value


def _flag_spec(field: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for one field, inferred from its annotation and metadata."""
    meta = field.metadata
    # argparse %-formats help strings: a literal "5%" must reach it as "5%%".
    kwargs: dict[str, Any] = {"help": meta.get("help", "").replace("%", "%%")}
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:  # X | None
        annotation, origin = args[0], typing.get_origin(args[0])
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    elif annotation is dict or origin is dict:
        kwargs["type"] = _mapping
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
    if meta.get("flag_type") is not None:
        kwargs["type"] = meta["flag_type"]
    if meta.get("nargs") is not None:
        kwargs["nargs"] = int(meta["nargs"]) if meta["nargs"].isdigit() else meta["nargs"]
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if "type" not in kwargs and "action" not in kwargs and "choices" not in kwargs:
        raise TypeError(f"cannot derive a flag for field {field.name!r} of type {annotation!r}")
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        kwargs["help"] += " (required)"
        return kwargs
    default = (field.default if field.default is not dataclasses.MISSING
               else field.default_factory())
    if default is None or default == {}:
        kwargs["help"] += " (default: none)" if default is None else " (default: {})"
    elif isinstance(default, bool):
        kwargs["help"] += f" (default: {'on' if default else 'off'})"
    else:
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs["help"] += f" (default: {shown})"
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """Add ``--config`` and one flag per field of ``cls`` (grouped as in ``-h``).

    Flags default to ``argparse.SUPPRESS`` so that only flags the user typed override the YAML.
    """
    parser.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                        help="YAML file of config fields (flags given here override it)")
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        group = f.metadata.get("group", "training")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        flag = "--" + f.name.replace("_", "-")
        groups[group].add_argument(flag, dest=f.name, default=argparse.SUPPRESS,
                                   **_flag_spec(f, hints[f.name]))


def load_yaml(path: str | Path, cls: type[TrainConfig]) -> dict[str, Any]:
    """Read a YAML mapping of ``cls`` fields (``-`` or ``_`` in keys); unknown keys raise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(raw).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown}; valid keys: {sorted(names)}")
    return values


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from ``--config`` YAML (if any) overridden by the flags the user gave."""
    fields = dataclasses.fields(cls)
    values = load_yaml(args.config, cls) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in {f.name for f in fields}})
    missing = [f.name for f in fields if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError("missing required setting(s): " + ", ".join(
            f"--{m.replace('_', '-')} (or `{m}:` in the YAML)" for m in missing))
    return cls(**values)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (re-loadable with ``--config``)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
