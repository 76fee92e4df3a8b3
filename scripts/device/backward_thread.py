"""Autograd's worker thread against the calling thread for one cluster-attention call (issue 3).

For aff_small's four stages at 512 px and stage 1 at 768 px (batch 16, bf16), host time per
eager forward + ``torch.autograd.grad`` of the package's Function (group structures shared, as in
the model) and of the PyTorch reference, with the backward on autograd's CUDA device thread
(PyTorch's default, "worker") and on the calling thread
(``affmae.devices.backward_on_calling_thread``, "caller"). Blocks of 30 calls, the four settings
alternated in one process, 8 blocks each: min and median of the block means. It first checks
that both modes give bitwise the same gradients.
Usage: python scripts/device/backward_thread.py OUT.txt [--dry] (--dry: CPU, Triton's
interpreter, one tiny stage, a few calls: checks the script, not the timings)
"""
import os
import statistics
import sys

import torch
from hostlib import DEV, DRY, block_ms

from affmae.bench.attention import _leaves, make_stage, torch_impl, triton_impl
from affmae.devices import backward_on_calling_thread

STAGES = [(64, 0)] if DRY else [(512, 0), (512, 1), (512, 2), (512, 3), (768, 0)]
ROUNDS, CALLS = (1, 2) if DRY else (8, 30)


def worker_thread():
    return torch.autograd.set_multithreading_enabled(True)


lines = [f"# {torch.cuda.get_device_name() if not DRY else 'CPU (dry)'}, torch {torch.__version__}, "
         f"{os.cpu_count()} CPUs; host ms per fwd + bwd, min / median of {ROUNDS} block means"]
for res, stage in STAGES:
    s = make_stage(res, stage, 1 if DRY else 16, torch.float32 if DRY else torch.bfloat16, DEV)
    leaves = _leaves(s)
    impls = {"triton": triton_impl(s, shared=True), "torch": torch_impl(s)}
    modes = {"worker": worker_thread, "caller": backward_on_calling_thread}
    steps = {}
    for iname, fn in impls.items():
        grads = {}
        for mname, mode in modes.items():
            def step(fn=fn, mode=mode):
                with mode():
                    return torch.autograd.grad(fn(*leaves), leaves, s["do"])
            grads[mname] = step()
            steps[f"{iname} {mname}"] = step
        same = all(torch.equal(a, b) for a, b in zip(grads["worker"], grads["caller"]))
        lines.append(f"{res}px s{stage + 1} {iname}: gradients bitwise equal in both modes: {same}")
        print(lines[-1], flush=True)
    for f in steps.values():  # warm up
        for _ in range(3):
            f()
    times = {k: [] for k in steps}
    for _ in range(ROUNDS):
        for k, f in steps.items():
            times[k].append(block_ms(f, CALLS))
    for k, t in times.items():
        lines.append(f"{res}px s{stage + 1} N={s['n_valid']:5d} {k:14s} min {min(t):.3f} median "
                     f"{statistics.median(t):.3f} ms")
        print(lines[-1], flush=True)
    for mname in modes:
        r = statistics.median(times[f"torch {mname}"]) / statistics.median(times[f"triton {mname}"])
        lines.append(f"{res}px s{stage + 1} {mname}: reference / triton (medians) {r:.2f}x")
        print(lines[-1], flush=True)
with open(sys.argv[1], "w") as fh:
    fh.write("\n".join(lines) + "\n")
