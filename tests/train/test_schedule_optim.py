"""Schedule values, AdamW parameter groups, and lr_scale surviving optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from affmae.train.optim import build_adamw, no_decay_names, param_groups
from affmae.train.schedule import lr_at, set_lr


def test_warmup_is_linear_and_reaches_base_lr():
    kw = dict(base_lr=1e-3, warmup_steps=10, total_steps=100, min_lr=1e-5)
    got = [lr_at(s, **kw) for s in range(10)]
    want = [1e-3 * (s + 1) / 10 for s in range(10)]
    assert got == pytest.approx(want, rel=1e-12), f"warmup lrs {got} != {want}"
    assert lr_at(10, **kw) == pytest.approx(1e-3), f"first cosine step {lr_at(10, **kw)}"


def test_cosine_midpoint_and_end():
    kw = dict(base_lr=1e-3, warmup_steps=10, total_steps=111, min_lr=1e-5)
    mid = lr_at(60, **kw)  # progress (60 - 10) / (111 - 1 - 10) = 0.5
    assert mid == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12), f"midpoint lr {mid}"
    assert lr_at(110, **kw) == pytest.approx(1e-5, rel=1e-12), "last step must be min_lr"
    assert lr_at(500, **kw) == pytest.approx(1e-5, rel=1e-12), "after the end: min_lr"
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "cosine part must not increase"


def test_no_warmup_starts_at_base_lr():
    assert lr_at(0, base_lr=2e-3, warmup_steps=0, total_steps=5) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, base_lr=1.0, warmup_steps=0, total_steps=5)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.blank = nn.Parameter(torch.zeros(2, 4))  # 2-D but exempt by name
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self) -> set[str]:
        return {"blank"}


def test_param_groups_exempt_norms_biases_and_named():
    model = _Toy()
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {"proj.weight", "head.weight"}, f"decayed: {decayed}"
    assert exempt == {"proj.bias", "norm.weight", "norm.bias", "blank", "head.bias"}, exempt
    assert no_decay_names(model) == exempt


def test_no_weight_decay_name_matching_nothing_raises():
    model = _Toy()
    model.no_weight_decay = lambda: {"does_not_exist"}
    with pytest.raises(ValueError, match="does_not_exist"):
        param_groups(model, 0.05)


def test_lr_scale_stays_in_force_after_steps():
    model = _Toy()
    scales = {"proj": 0.36, "norm": 0.6, "blank": 0.6, "head": 1.0}
    groups = param_groups(model, 0.05, lr_scale=lambda n: scales[n.split(".")[0]])
    opt = build_adamw(groups, lr=1e-3, betas=(0.9, 0.99), device=torch.device("cpu"))
    for step in range(5):
        lr = lr_at(step, base_lr=1e-3, warmup_steps=2, total_steps=5)
        set_lr(opt, lr)
        model.head(model.norm(model.proj(torch.randn(3, 4)) + model.blank.sum(0))).sum().backward()
        opt.step()
        opt.zero_grad()
        for g in opt.param_groups:
            assert math.isclose(g["lr"], lr * g["lr_scale"], rel_tol=1e-12), (
                f"step {step}: group {g['name']} lr {g['lr']} != {lr} * {g['lr_scale']}")
    assert sorted({g["lr_scale"] for g in opt.param_groups}) == [0.36, 0.6, 1.0]
    saved = opt.state_dict()["param_groups"]
    assert sorted({g["lr_scale"] for g in saved}) == [0.36, 0.6, 1.0], "lr_scale not checkpointed"
