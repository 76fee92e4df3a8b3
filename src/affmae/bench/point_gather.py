"""Decoder point-gather benchmark: Triton kernel vs the ``embedding_bag`` reference.

``python -m affmae.bench.point_gather [--out results.json] [--batch 16] [--no-sweep] [--step]``

The deformable decoder's interpolation (AFFMAE sec. 3.2; ``affmae.ops.point_gather``) at the
aff_small decoder's sizes at 512 px, batch 16, bf16 table, float32 weights: Nq = 2048 queries,
H = 6 heads, F = 64, Pt = 4 points, K = 4 neighbours; Nk = 2048 (self-attention over the queries,
and stage-1 cross-attention) and the stage outputs 819 / 327 / 130 (cross-attention, stages 2-4;
mask ratio 0.5, d_s 0.4). A training step calls it 8 times: self-attention with Nk = 2048 in each
of the 4 blocks, cross-attention once per stage; "step" sums those 8 calls.

Per Nk and implementation: forward and forward + backward (``torch.autograd.grad`` for table and
weights) median time (``triton.testing.do_bench``, L2 flushed between runs) and the peak memory of
one forward + backward above the inputs (``torch.cuda.max_memory_allocated``). ``--sweep`` (default
on) also times the raw Triton kernels (no autograd) over row tiles and launch widths.
``--step`` also times a whole aff_small training step (512 px, bf16 autocast, mask ratio 0.5,
``affmae.bench.step``) with the decoder's gather on each backend (``AFFMAE_POINT_GATHER_BACKEND``).
Implementations: ``triton`` (the default: d_table by float32 atomics), ``triton_sorted``
(d_table by sort + segment sums, deterministic), ``triton_window`` (d_table summed over a window
of table rows per program before the atomics; opt-in, slower than ``triton`` on an H200),
``torch`` (the ``embedding_bag`` reference). Slots two ways:
"random" (uniform in [0, Nk)) and "local" (slot of query q near q * Nk / Nq, +-3: neighbouring
rows share table rows, as the decoder's spatially local neighbours do; the worst case for atomics).
Results: docs/BENCHMARKS.md, section "Decoder point gather kernel".
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from affmae.bench.timing import time_op
from affmae.ops.point_gather import gather_weighted
from affmae.ops.point_gather.reference import gather_weighted_ref

NQ, HEADS, FEAT, POINTS, KNN = 2048, 6, 64, 4, 4
NK_VALUES = (2048, 819, 327, 130)
STEP_CALLS = {2048: 5, 819: 1, 327: 1, 130: 1}  # 4 self-attention + 1 cross at Nk = 2048


def make_inputs(batch: int, nk: int, dtype: torch.dtype, seed: int = 0, slots: str = "random") -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    table = torch.randn(batch, nk, HEADS, FEAT, device="cuda", generator=g).to(dtype)
    shape = (batch, NQ, HEADS, POINTS, KNN)
    if slots == "random":
        sel = torch.randint(0, nk, shape, device="cuda", generator=g)
    else:  # local: near q * Nk / Nq
        centre = (torch.arange(NQ, device="cuda") * nk // NQ).view(1, NQ, 1, 1, 1)
        sel = (centre + torch.randint(-3, 4, shape, device="cuda", generator=g)).clamp(0, nk - 1)
    logits = torch.randn(batch, NQ, HEADS, POINTS, KNN, device="cuda", generator=g)
    weights = torch.softmax(logits, dim=-1)  # float32, as interpolation_weights gives
    do = torch.randn(batch, NQ, HEADS, POINTS, FEAT, device="cuda", generator=g).to(dtype)
    return dict(table=table, sel=sel, weights=weights, do=do)


def measure(fn, s: dict) -> dict:
    """Forward, forward + backward median ms; peak MiB of one forward + backward."""
    table = s["table"].clone().requires_grad_()
    weights = s["weights"].clone().requires_grad_()

    def step():
        out = fn(table, s["sel"], weights)
        torch.autograd.grad(out, (table, weights), s["do"])

    return time_op(lambda: fn(table, s["sel"], weights), step)


def sweep(s: dict) -> dict:
    """Raw kernels (no autograd): forward and backward ms per (row tile, warps)."""
    from triton.testing import do_bench

    from affmae.ops.point_gather import kernel

    args = (s["table"], s["sel"], s["weights"])
    out = {}
    for block_rows in (16, 32, 64):
        for nw in (2, 4):
            key = f"r{block_rows}_w{nw}"
            out[f"fwd_{key}_ms"] = do_bench(
                lambda: kernel.gather_forward(*args, block_rows=block_rows, num_warps=nw),
                return_mode="median")
            out[f"bwd_{key}_ms"] = do_bench(
                lambda: kernel.gather_backward(s["do"], *args, dtable="atomic", block_rows=block_rows,
                                               num_warps=nw),
                return_mode="median")
    return out


def step_times(batch: int, steps: int = 10) -> dict:
    """Median ms and peak MiB of a whole aff_small training step per gather backend."""
    import os

    from affmae import create_model
    from affmae.bench.step import Trainer, measure_steps
    from affmae.ops.masking import make_mask

    res = 512
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 1, res, res, generator=g).cuda()
    is_masked = make_mask(batch, (res // 8, res // 8), 0.5, kind="uniform", generator=g).cuda()
    out = {}
    old = {k: os.environ.get(k) for k in ("AFFMAE_POINT_GATHER_BACKEND", "AFFMAE_POINT_GATHER_DTABLE")}
    try:
        for backend, dtable in (("torch", "atomic"), ("triton", "sorted"), ("triton", "atomic"),
                                ("triton", "window"), ("torch", "atomic")):  # torch again: drift
            os.environ["AFFMAE_POINT_GATHER_BACKEND"] = backend
            os.environ["AFFMAE_POINT_GATHER_DTABLE"] = dtable
            torch.manual_seed(0)
            model = create_model("aff_small").cuda()
            stats = measure_steps(Trainer(model, imgs, is_masked, dtype="bf16"), steps=steps, warmup=3)
            times = sorted(stats.step_ms)
            name = backend if backend == "torch" else f"{backend}_{dtable}"
            name = name + "_again" if name in out else name
            out[name] = dict(step_ms=times[len(times) // 2], peak_mib=stats.peak_mem_bytes / 2**20,
                             final_loss=stats.final_loss)
            print(f"aff_small step, gather {name}: {out[name]['step_ms']:.1f} ms, "
                  f"peak {out[name]['peak_mib']:.0f} MiB, loss {stats.final_loss:.4f}", flush=True)
            del model
            torch.cuda.empty_cache()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def run(batch: int, do_sweep: bool, out_path: str | None, do_step: bool = False) -> dict:
    import triton

    res = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), batch=batch, nq=NQ, heads=HEADS, feat=FEAT,
        points=POINTS, knn=KNN, dtype="bf16", rows=[],
    )
    from affmae.ops.point_gather.function import gather_weighted_triton

    impls = {
        "triton": lambda t, s, w: gather_weighted(t, s, w, backend="triton"),
        "triton_sorted": lambda t, s, w: gather_weighted_triton(t, s, w, dtable="sorted"),
        "triton_window": lambda t, s, w: gather_weighted_triton(t, s, w, dtable="window"),
        "torch": gather_weighted_ref,
    }
    for slots in ("local", "random"):
        for nk in NK_VALUES:
            s = make_inputs(batch, nk, torch.bfloat16, seed=nk, slots=slots)
            row = dict(nk=nk, slots=slots)
            for name, fn in impls.items():
                row[name] = measure(fn, s)
            if do_sweep and slots == "random" and nk in (2048, 130):
                row["sweep"] = sweep(s)
            res["rows"].append(row)
            print(f"{slots:6s} Nk={nk:5d} " + " | ".join(
                f"{n} fwd {row[n]['fwd_ms']:.3f} fwd+bwd {row[n]['fwdbwd_ms']:.3f} ms "
                f"peak {row[n]['peak_mib']:.0f} MiB" for n in impls), flush=True)
            if out_path:
                with open(out_path, "w") as f:
                    json.dump(res, f, indent=1)
    res["step"] = {}
    for slots in ("local", "random"):
        rows = [r for r in res["rows"] if r["slots"] == slots]
        step = {impl: {k: sum(STEP_CALLS[r["nk"]] * r[impl][k] for r in rows)
                       for k in ("fwd_ms", "fwdbwd_ms")} for impl in impls}
        res["step"][slots] = step
        print(f"{slots} slots, step (8 calls): " + " | ".join(
            f"{n} fwd {v['fwd_ms']:.2f} fwd+bwd {v['fwdbwd_ms']:.2f} ms" for n, v in step.items()))
    if do_sweep:
        for row in res["rows"]:
            if "sweep" in row:
                best = {p: min((v, k) for k, v in row["sweep"].items() if k.startswith(p))
                        for p in ("fwd", "bwd")}
                print(f"Nk={row['nk']} sweep: " + ", ".join(
                    f"best {p} {v:.3f} ms ({k})" for p, (v, k) in best.items()))
    if do_step:
        res["train_step"] = step_times(batch)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write results as JSON to this path")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the raw-kernel sweep over row tiles and launch widths")
    parser.add_argument("--step", action="store_true",
                        help="also time a whole aff_small training step with each gather backend")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("affmae.bench.point_gather needs a CUDA GPU", file=sys.stderr)
        return 2
    run(args.batch, not args.no_sweep, args.out, args.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
