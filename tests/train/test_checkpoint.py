"""Atomic checkpoints: a crash mid-write leaves the previous file intact; weights_only loads."""

from __future__ import annotations

import pytest
import torch

from affmae.train import checkpoint as ckpt_mod
from affmae.train.checkpoint import atomic_save, load_checkpoint


def _state(v: float) -> dict:
    return {"model_name": "m", "model_config": {"a": [1, 2]}, "model": {"w": torch.full((3,), v)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]},
            "step": int(v), "rng": [{"cpu": torch.get_rng_state()}]}


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    atomic_save(_state(1.0), path)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")  # a torn write, then the process "dies"
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        atomic_save(_state(2.0), path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3)), (
        f"previous checkpoint damaged: step {loaded['step']}")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "latest.pt"]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def test_replace_is_complete_and_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save(_state(1.0), path)
    atomic_save(_state(2.0), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 2 and loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}}, partial)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_checkpoint(partial)
