"""AdamW with the paper's parameter groups (paper sec. 4; DESIGN 5, 7).

Weight decay is applied only to matrices: every parameter with ``ndim <= 1`` (norm scales,
biases, temperatures) and every name in ``model.no_weight_decay()`` (blank tokens, mask
tokens, ...) is exempt. Each group carries an ``lr_scale`` (1.0 for pretraining; layer-wise lr
decay factors for fine-tuning) that ``schedule.set_lr`` multiplies in at every step.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def no_decay_names(model: nn.Module) -> set[str]:
    """Names exempt from weight decay: ndim <= 1 parameters and ``model.no_weight_decay()``.

    An entry of ``no_weight_decay()`` may name a parameter or a module (all its parameters);
    an entry that matches nothing raises, so a renamed parameter cannot silently get decay.
    """
    named = dict(model.named_parameters())
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    out = {n for n, p in named.items() if p.ndim <= 1}
    for entry in listed:
        hits = {n for n in named if n == entry or n.startswith(entry + ".")}
        if not hits:
            raise ValueError(f"{type(model).__name__}.no_weight_decay() names {entry!r}, "
                             "which matches no parameter")
        out |= hits
    return out


def param_groups(model: nn.Module, weight_decay: float,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """Parameter groups keyed by (decay or not, lr scale).

    Args:
        model: the unwrapped model (names as in its ``named_parameters``).
        weight_decay: decay of the decayed group.
        lr_scale: ``name -> factor`` (e.g. layer-wise lr decay); ``None`` = 1.0 everywhere.
    Returns:
        groups with keys ``params``, ``weight_decay``, ``lr_scale``, ``name``; frozen
        parameters (``requires_grad=False``) are left out.
    """
    exempt = no_decay_names(model)
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = name not in exempt
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        key = (decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale,
                           "name": f"{'decay' if decay else 'no_decay'}_x{scale:g}"}
        groups[key]["params"].append(p)
    return list(groups.values())


def build_adamw(groups: Iterable[dict], lr: float, betas: tuple[float, float],
                device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` (fused kernel on CUDA; the default foreach path on CPU)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(list(groups), lr=lr, betas=betas, fused=fused)
