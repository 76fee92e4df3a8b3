"""Saved-activation accounting (``affmae.bench.memory``): exact bytes on a hand-counted model,
attribution to the innermost module, shared storages counted once, parameters left out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from affmae.bench.memory import format_result, main, measure, saved_activation_bytes


def test_hand_counted_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4, requires_grad=True)
    saved = saved_activation_bytes(model, lambda: model(x).sum())
    # Linear 0 saves its input x (3 x 4 fp32 = 48 B; the weight is a parameter: not counted).
    # ReLU saves its output (3 x 8 fp32 = 96 B); Linear 2 saves that same tensor as its input,
    # which is counted once, with the module that saved it first.
    assert saved.total == 48 + 96, saved
    assert saved.by_group == {"0": 48, "1": 96}, saved.by_group
    assert saved.by_kind == {"ReLU": 96, "Linear": 48}, saved.by_kind


def test_views_share_one_storage_and_no_graph_saves_nothing():
    lin = nn.Linear(6, 6)
    x = torch.randn(2, 6, requires_grad=True)

    def fwd():
        y = lin(x)  # saves x: 48 B
        return (y[:, :3] * y[:, 3:]).sum()  # saves two views of y: one 48 B storage

    assert saved_activation_bytes(lin, fwd).total == 96
    with torch.no_grad():
        assert saved_activation_bytes(lin, lambda: lin(x)).total == 0


@pytest.mark.parametrize("spec", ["aff_tiny", "vit_tiny"])
def test_registered_models_and_cli(spec, capsys):
    r = measure(spec, 64, 2, "fp32", torch.device("cpu"))
    assert r["saved_bytes"] > 0 and sum(r["by_group"].values()) == r["saved_bytes"], r
    assert sum(r["by_kind"].values()) == r["saved_bytes"], r["by_kind"]
    assert "decoder" in " ".join(r["by_group"]), r["by_group"]
    # Twice the batch saves about twice the bytes (activations scale with the batch).
    r4 = measure(spec, 64, 4, "fp32", torch.device("cpu"))
    assert 1.8 < r4["saved_bytes"] / r["saved_bytes"] < 2.2, (r4["saved_bytes"], r["saved_bytes"])
    assert f"{spec} at 64 px, batch 2" in format_result(r)
    assert main(["--models", spec, "--resolutions", "64", "--batch", "1", "--dtype", "fp32"]) == 0
    assert "saved for the backward" in capsys.readouterr().out
