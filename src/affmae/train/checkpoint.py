"""Atomic training checkpoints, loadable with ``torch.load(weights_only=True)``.

A checkpoint is written to a temporary file in the target's folder, flushed and fsync'ed, then
renamed over the target with ``os.replace`` (atomic on POSIX), and the folder is fsync'ed: a
crash at any moment leaves either the previous file or the new one, never a torn file.

Contents follow the registry contract (``affmae.models.registry``): ``model_name``,
``model_config`` (dict), ``model`` (state dict), ``data_stats`` ({"mean", "std"}), plus the
training state: ``optimizer``, ``scaler``, ``step`` (optimizer steps completed = next step to
run), ``epoch``, ``step_in_epoch``, ``steps_per_epoch``, ``total_steps``, ``rng`` (per-rank torch
CPU and CUDA generator states as uint8 tensors), ``world_size``, ``config`` (the job's config
dict), ``job``, ``elapsed`` (seconds of training so far), ``best`` (for jobs that evaluate),
``torch_version``. Only tensors and plain Python values: no numpy, no dataclasses, no code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file in the same folder, fsync, replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only when the write failed before the rename
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read checkpoint ({e})") from e
    missing = [k for k in ("model_name", "model_config", "model", "optimizer", "step")
               if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint (missing {missing})")
    return ckpt


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's global RNG states (dropout, drop-path) as uint8 tensors."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what ``rng_state`` returned (the CUDA part only on a CUDA device)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
