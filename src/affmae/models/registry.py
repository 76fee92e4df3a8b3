"""Named model sizes and checkpoint loading.

Factories are registered by name and apply overrides through ``dataclasses.replace`` on the
family's config, so a misspelt key fails at once. Checkpoints carry the model name and its full
config, so a model rebuilds from the file alone (no code is unpickled):

* ``*.safetensors``: weights, with metadata ``{"model_name": ..., "model_config": <json>}``.
* ``*.pt`` training checkpoints: a dict loadable with ``torch.load(weights_only=True)`` holding
  ``model_name``, ``model_config`` (dict), ``model`` (state dict) and training state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``factory(**overrides) -> nn.Module`` under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _import_families() -> None:
    # Importing a family module registers its sizes.
    from affmae.models import mae, segmentation, vit  # noqa: F401


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    _import_families()
    return sorted(_REGISTRY)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; ``overrides`` replace fields of its config (typos raise)."""
    _import_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**overrides)
    model.model_name = name
    return model


def replace_config(config: Any, overrides: dict[str, Any]) -> Any:
    """``dataclasses.replace`` with a message naming unknown keys (lists become tuples)."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(
            f"{type(config).__name__} has no field(s) {unknown}; valid fields: {sorted(names)}"
        )
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(config, **fixed)


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's config as a plain dict (JSON- and weights_only-safe)."""
    d = dataclasses.asdict(model.config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling code -> dict with model_name, model_config, model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "model_name" not in meta or "model_config" not in meta:
            raise ValueError(f"{path}: safetensors file has no model_name/model_config metadata")
        out: dict[str, Any] = {
            "model_name": meta["model_name"],
            "model_config": json.loads(meta["model_config"]),
            "model": load_file(str(path), device=str(map_location)),
        }
        for key in ("data_stats", "extra"):
            if key in meta:
                out[key] = json.loads(meta[key])
        return out
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt or not a checkpoint
        raise ValueError(f"{path}: cannot read checkpoint ({e})") from e
    for key in ("model_name", "model_config", "model"):
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint has no {key!r} entry")
    return ckpt


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any
) -> nn.Module:
    """Rebuild a model from a checkpoint (``.pt`` or ``.safetensors``) and load its weights."""
    ckpt = read_checkpoint(path, map_location)
    cfg = dict(ckpt["model_config"])
    cfg.update(overrides)
    model = create_model(ckpt["model_name"], **cfg)
    model.load_state_dict(ckpt["model"])
    if "data_stats" in ckpt:
        model.data_stats = dict(ckpt["data_stats"])
    return model


def save_safetensors(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                     data_stats: dict[str, float] | None = None) -> None:
    """Write weights (optionally cast, e.g. bf16) with the config as metadata."""
    from safetensors.torch import save_file

    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in model.state_dict().items()}
    meta = {"model_name": model.model_name, "model_config": json.dumps(config_dict(model))}
    if data_stats is not None:
        meta["data_stats"] = json.dumps(data_stats)
    tmp = Path(str(path) + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)
