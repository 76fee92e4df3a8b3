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
@pytest.mark.parametrize("sync", ["ddp", "allreduce"])
def test_two_process_gloo_run_matches_one_process(images64, tmp_path, sync):
    """Both ways to average gradients (DDP, or one bucketed all_reduce per step: what a graphed
    step under torchrun uses) give the 1-process losses at equal global batch."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "affmae.cli", "pretrain", "--data", str(images64), "--out", str(out), *ARGS,
           "--grad-sync", sync]
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


@pytest.mark.slow
def test_two_process_finetune_matches_one_process(tmp_path):
    """Fine-tuning under torchrun (gloo): same global batch -> the losses and the evaluation of
    one process; rank 0 alone writes eval.csv / metrics.json, and the evaluation is reduced over
    both ranks (each scores half of the held-out images)."""
    from labelled import write_labelled

    data = write_labelled(tmp_path / "data", 10, (48, 48), seed=0)
    args = ["finetune", "--data", str(data), "--model", "aff_tiny", "--size", "32",
            "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--lr", "1e-3",
            "--val-fraction", "0.4", "--eval-every", "3", "--no-augment", "--device", "cpu",
            "--num-workers", "0", "--log-every", "1", "--figure-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("ddp", ["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", "-m", "affmae.cli"]),
                           ("single", ["-m", "affmae.cli"])):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, *launcher, *args, "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        runs[name] = (read_log(out / "log.csv"), read_log(out / "eval.csv"))
    (ddp_log, ddp_eval), (one_log, one_eval) = runs["ddp"], runs["single"]
    ddp_loss, one_loss = [r["loss"] for r in ddp_log], [r["loss"] for r in one_log]
    assert len(ddp_loss) == 3 and ddp_loss == pytest.approx(one_loss, rel=1e-4), (
        f"2 ranks {ddp_loss} vs 1 rank {one_loss}")
    assert len(ddp_eval) == 1 and ddp_eval[0]["step"] == 3, ddp_eval
    for key, value in one_eval[0].items():
        assert ddp_eval[0][key] == pytest.approx(value, abs=1e-4), (
            f"{key}: 2 ranks {ddp_eval[0][key]} vs 1 rank {value}")
    ckpt = torch.load(tmp_path / "ddp" / "latest.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3, (ckpt["world_size"], ckpt["step"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_two_gpus_cuda_graph_matches_one_gpu(images64, tmp_path):
    """torchrun on 2 GPUs with --cuda-graph (each rank replays its captured loss; gradients
    averaged by one all_reduce per step) tracks one graphed GPU at equal global batch."""
    common = ["pretrain", "--data", str(images64), "--size", "64", "--model", "aff_tiny",
              "--model-overrides", "{drop_path: 0.0}", "--batch-size", "8", "--grad-accum", "2",
              "--steps", "6", "--lr", "1e-4", "--warmup-steps", "1", "--precision", "bf16",
              "--device", "cuda", "--num-workers", "0", "--log-every", "1", "--ckpt-every", "6",
              "--figure-every", "0", "--no-progress", "--cuda-graph"]
    runs = {}
    for name, launcher in (("two", ["-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", "-m", "affmae.cli"]),
                           ("one", ["-m", "affmae.cli"])):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, *launcher, *common, "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        assert ", CUDA graph |" in proc.stderr, proc.stderr[-2000:]
        runs[name] = [r["loss"] for r in read_log(out / "log.csv")]
    assert len(runs["two"]) == 6
    assert runs["two"] == pytest.approx(runs["one"], rel=1e-2), runs


def _sync_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from affmae.train.distributed import DistContext, all_reduce_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctx = DistContext(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
        a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad = torch.full((3,), 1.0 + 2 * rank)  # rank 0: 1, rank 1: 3
        if rank == 1:
            b.grad = torch.full((3,), 2.0)  # only rank 1 has one
        all_reduce_gradients([a, b, c], ctx, bucket_bytes=16)  # 16 bytes: one tensor a bucket
        results[rank] = (a.grad.tolist(), b.grad.tolist(), c.grad)
    finally:
        dist.destroy_process_group()


def test_all_reduce_gradients_averages_and_keeps_unused_parameters_gradient_free(tmp_path):
    """The mean over ranks, zeros standing in for a gradient one rank lacks, and no gradient
    where no rank has one (so AdamW skips it, as in one process)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in (0, 1):
        a, b, c = results[rank]
        assert a == [2.0] * 3 and b == [1.0] * 3 and c is None, (rank, a, b, c)
