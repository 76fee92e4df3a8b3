"""A 2-process gloo DDP run through torchrun matches a 1-process run at equal global batch."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from affmae.train.config import PretrainConfig
from affmae.train.logger import read_log
from affmae.train.pretrain import run_pretrain

ARGS = ["--size", "64", "--model", "aff_tiny", "--batch-size", "4", "--grad-accum", "2",
        "--steps", "3", "--lr", "2e-3", "--warmup-steps", "1", "--device", "cpu",
        "--num-workers", "0", "--log-every", "1", "--ckpt-every", "3", "--figure-every", "0",
        "--no-progress"]


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(images64, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "affmae.cli", "pretrain", "--data", str(images64), "--out", str(out), *ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}"

    rows = read_log(out / "log.csv")
    ddp = [r["loss"] for r in rows]
    assert len(ddp) == 3 and all(math.isfinite(v) for v in ddp), f"DDP losses {ddp}"
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 3, (
        f"world {ckpt['world_size']}, rng states {len(ckpt['rng'])}, step {ckpt['step']}")
    assert (out / "model.safetensors").is_file()

    # Same global batch in one process: same images, same masks -> the same losses up to the
    # order of floating-point reductions (aff_tiny has no drop-path).
    single = run_pretrain(PretrainConfig(
        data=str(images64), out=str(tmp_path / "single"), size=64, model="aff_tiny",
        batch_size=4, grad_accum=2, steps=3, lr=2e-3, warmup_steps=1, device="cpu",
        num_workers=0, log_every=1, ckpt_every=3, figure_every=0, progress=False)).losses
    assert ddp == pytest.approx(single, rel=1e-4), f"2 ranks {ddp} vs 1 rank {single}"
