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
Slots are uniform random in [0, Nk) (the model's are spatially local, so this is the pessimistic
case for cache reuse and the optimistic one for atomic contention).
Results: docs/BENCHMARKS.md, section "Decoder point gather kernel".
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from affmae.ops.point_gather import gather_weighted
from affmae.ops.point_gather.reference import gather_weighted_ref

NQ, HEADS, FEAT, POINTS, KNN = 2048, 6, 64, 4, 4
NK_VALUES = (2048, 819, 327, 130)
STEP_CALLS = {2048: 5, 819: 1, 327: 1, 130: 1}  # 4 self-attention + 1 cross at Nk = 2048


def make_inputs(batch: int, nk: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    table = torch.randn(batch, nk, HEADS, FEAT, device="cuda", generator=g).to(dtype)
    sel = torch.randint(0, nk, (batch, NQ, HEADS, POINTS, KNN), device="cuda", generator=g)
    logits = torch.randn(batch, NQ, HEADS, POINTS, KNN, device="cuda", generator=g)
    weights = torch.softmax(logits, dim=-1)  # float32, as interpolation_weights gives
    do = torch.randn(batch, NQ, HEADS, POINTS, FEAT, device="cuda", generator=g).to(dtype)
    return dict(table=table, sel=sel, weights=weights, do=do)


def measure(fn, s: dict) -> dict:
    """Forward, forward + backward median ms; peak MiB of one forward + backward."""
    from triton.testing import do_bench

    table = s["table"].clone().requires_grad_()
    weights = s["weights"].clone().requires_grad_()
    with torch.no_grad():
        fwd_ms = do_bench(lambda: fn(table, s["sel"], weights), return_mode="median")

    def step():
        out = fn(table, s["sel"], weights)
        torch.autograd.grad(out, (table, weights), s["do"])

    step()  # compile / warm up outside the memory measurement
    fb_ms = do_bench(step, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return dict(fwd_ms=fwd_ms, fwdbwd_ms=fb_ms, peak_mib=peak)


def sweep(s: dict) -> dict:
    """Raw kernels (no autograd): forward and backward ms per (row tile, warps)."""
    from triton.testing import do_bench

    from affmae.ops.point_gather import kernel

    args = (s["table"], s["sel"], s["weights"])
    out = {}
    for block_rows in (32, 64, 128):
        for nw in (2, 4, 8):
            key = f"r{block_rows}_w{nw}"
            out[f"fwd_{key}_ms"] = do_bench(
                lambda: kernel.gather_forward(*args, block_rows=block_rows, num_warps=nw),
                return_mode="median")
            out[f"bwd_{key}_ms"] = do_bench(
                lambda: kernel.gather_backward(s["do"], *args, block_rows=block_rows, num_warps=nw),
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
    old = os.environ.get("AFFMAE_POINT_GATHER_BACKEND")
    try:
        for backend in ("torch", "triton"):
            os.environ["AFFMAE_POINT_GATHER_BACKEND"] = backend
            torch.manual_seed(0)
            model = create_model("aff_small").cuda()
            stats = measure_steps(Trainer(model, imgs, is_masked, dtype="bf16"), steps=steps, warmup=3)
            times = sorted(stats.step_ms)
            out[backend] = dict(step_ms=times[len(times) // 2], peak_mib=stats.peak_mem_bytes / 2**20,
                                final_loss=stats.final_loss)
            print(f"aff_small step, gather {backend}: {out[backend]['step_ms']:.1f} ms, "
                  f"peak {out[backend]['peak_mib']:.0f} MiB, loss {stats.final_loss:.4f}", flush=True)
            del model
            torch.cuda.empty_cache()
    finally:
        if old is None:
            os.environ.pop("AFFMAE_POINT_GATHER_BACKEND", None)
        else:
            os.environ["AFFMAE_POINT_GATHER_BACKEND"] = old
    return out


def run(batch: int, do_sweep: bool, out_path: str | None, do_step: bool = False) -> dict:
    import triton

    res = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), batch=batch, nq=NQ, heads=HEADS, feat=FEAT,
        points=POINTS, knn=KNN, dtype="bf16", rows=[],
    )
    impls = {
        "triton": lambda t, s, w: gather_weighted(t, s, w, backend="triton"),
        "torch": gather_weighted_ref,
    }
    for nk in NK_VALUES:
        s = make_inputs(batch, nk, torch.bfloat16, seed=nk)
        row = dict(nk=nk)
        for name, fn in impls.items():
            row[name] = measure(fn, s)
        if do_sweep and nk in (2048, 130):
            row["sweep"] = sweep(s)
        res["rows"].append(row)
        t, r = row["triton"], row["torch"]
        print(f"Nk={nk:5d}  triton fwd {t['fwd_ms']:.3f} fwd+bwd {t['fwdbwd_ms']:.3f} ms "
              f"peak {t['peak_mib']:.0f} MiB | torch fwd {r['fwd_ms']:.3f} fwd+bwd "
              f"{r['fwdbwd_ms']:.3f} ms peak {r['peak_mib']:.0f} MiB", flush=True)
        if out_path:
            with open(out_path, "w") as f:
                json.dump(res, f, indent=1)
    step = {impl: {k: sum(STEP_CALLS[row["nk"]] * row[impl][k] for row in res["rows"])
                   for k in ("fwd_ms", "fwdbwd_ms")} for impl in impls}
    res["step"] = step
    print(f"step (8 calls): triton fwd {step['triton']['fwd_ms']:.2f} fwd+bwd "
          f"{step['triton']['fwdbwd_ms']:.2f} ms | torch fwd {step['torch']['fwd_ms']:.2f} "
          f"fwd+bwd {step['torch']['fwdbwd_ms']:.2f} ms")
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
