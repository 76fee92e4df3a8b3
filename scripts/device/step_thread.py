"""Autograd's worker thread against the calling thread for a whole eager training step.

Session 16's probe (backward_thread.py) timed one cluster-attention call with its own
``backward()``: one handoff to autograd's worker thread per call. A training step has one
``backward()`` per step, so the handoff happens once per step; this probe measures what the
trainer's switch (``affmae.devices.backward_on_calling_thread``) does to the step itself.
``affmae bench``'s eager step (aff_small, batch 16, bf16, Perlin mask 0.5: forward, backward,
clip, fused AdamW) with the backward on the calling thread ("caller", the package's default)
and with ``affmae.bench.step``'s switch replaced by a no-op ("worker", PyTorch's default),
alternated in one process: ROUNDS blocks of STEPS steps per mode, each block's ms per step
(wall clock, GPU drained before and after) and host ms per step (the Python time to enqueue
the block's steps). Min and median of the block values.
Usage: python scripts/device/step_thread.py OUT.txt [RES ...] [--dry] (--dry: CPU, aff_tiny at
64 px, 2 rounds of 2 steps: checks the script, not the timings)
"""
import contextlib
import os
import statistics
import sys
import time

import torch

import affmae.bench.step as step_mod
from affmae import create_model
from affmae.bench.cli import make_batch
from affmae.devices import backward_on_calling_thread

DRY = "--dry" in sys.argv
DEV = "cpu" if DRY else "cuda"
MODEL = "aff_tiny" if DRY else "aff_small"
RESOLUTIONS = [64] if DRY else [int(a) for a in sys.argv[2:] if a.isdigit()] or [512]
ROUNDS, STEPS, WARMUP = (2, 2, 1) if DRY else (8, 10, 5)
BATCH = 2 if DRY else 16
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
MODES = {"caller": backward_on_calling_thread, "worker": contextlib.nullcontext}


def block(trainer) -> tuple[float, float]:
    """ms per step (drained before and after) and host ms per step to enqueue them."""
    sync()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        trainer.step()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return 1e3 * (t2 - t0) / STEPS, 1e3 * (t1 - t0) / STEPS


def main() -> None:
    out = sys.argv[1]
    lines = [f"# {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'}, torch "
             f"{torch.__version__}, {MODEL}, batch {BATCH}, bf16, eager step; affinity "
             f"{sorted(os.sched_getaffinity(0))[:4]}... ({len(os.sched_getaffinity(0))} cpus); "
             f"{ROUNDS} alternated blocks of {STEPS} steps per mode",
             "res  mode    step ms min / median   host ms min / median   loss"]
    for res in RESOLUTIONS:
        torch.manual_seed(0)
        model = create_model(MODEL).to(DEV).train()
        imgs, is_masked = make_batch(res, BATCH, 0.5, "perlin", 0, model.config.patch_size)
        trainer = step_mod.Trainer(model, imgs.to(DEV), is_masked.to(DEV), dtype="bf16")
        for _ in range(WARMUP):
            trainer.step()
        got = {m: [] for m in MODES}
        for _ in range(ROUNDS):
            for mode, ctx in MODES.items():
                step_mod.backward_on_calling_thread = ctx
                got[mode].append(block(trainer))
        step_mod.backward_on_calling_thread = backward_on_calling_thread
        loss = float(trainer.step())
        for mode, vals in got.items():
            st, ho = [v[0] for v in vals], [v[1] for v in vals]
            lines.append(f"{res:<4} {mode:<7} {min(st):8.2f} / {statistics.median(st):8.2f}"
                         f"      {min(ho):8.2f} / {statistics.median(ho):8.2f}      {loss:.4f}")
        print("\n".join(lines[-2:]), flush=True)
        del trainer, model
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
