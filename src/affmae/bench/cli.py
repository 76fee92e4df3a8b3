"""``affmae bench``: AFF vs ViT side by side, in one process (AFFMAE Table 1 / Fig. 10; DESIGN 6).

For every model and resolution: parameter count; forward FLOPs of one sample (custom ops
counted, reported as FLOPs and as MACs = FLOPs / 2; the paper's "FLOPs" are MACs); a full
training step (forward + loss, backward, clip, AdamW step) under autocast on the same batch and
the same masks for every model: median step time, images/s and peak memory with the optimiser
state. Then how step time grows with the token count (log-log slope between resolutions), an
optional per-label profile of one step, a table on stdout, JSON (--out) and a PNG (--plot).
Each row also goes to stderr as soon as it is measured, and --out holds the rows so far
(``"complete": false`` until the end), so a run stopped at a later size keeps what it measured.

Failures stay local: an out-of-memory error is reported as "OOM" for that (model, resolution)
and the run goes on; any other error is reported in the table, printed to stderr and makes the
command exit with status 1.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
import math
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from affmae.devices import resolve_device
from affmae.bench.flops import count_model_flops
from affmae.bench.plot import plot_results
from affmae.bench.profile import format_profile, profile_step
from affmae.bench.provenance import source_commit
from affmae.bench.step import DTYPES, Trainer, measure_steps

GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["aff_small", "vit_small"],
                        metavar="NAME[:KEY=VAL,...]",
                        help="registered models, optionally with config overrides, e.g. "
                             "aff_small:pred_ratio=0.5")
    parser.add_argument("--crossmae", nargs="?", type=float, const=0.5, default=None,
                        metavar="RATIO",
                        help="also bench CrossMAE-style variants reconstructing RATIO of the masked "
                             "patches (0.5 when given without a value): NAME_crossmae where "
                             "registered, else NAME with pred_ratio=RATIO")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[448, 512, 768, 1024],
                        metavar="PX", help="square image sizes")
    parser.add_argument("--batch", type=int, default=16, help="training batch size")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps; the median is reported (DESIGN 6 asks >= 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16",
                        help="autocast dtype of the step (fp16 uses loss scaling)")
    parser.add_argument("--compile", nargs="?", const="model", default="none",
                        choices=("none", "model", "blocks"),
                        help="torch.compile every model alike (dynamic=False): 'model' (the "
                             "default when given without a value) the whole model, 'blocks' "
                             "each transformer block (affmae.models.compiled)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture each model's whole training step in one CUDA graph and "
                             "time its replays (no Python or launch overhead), all alike; "
                             "CUDA only, bf16/fp32")
    parser.add_argument("--mask-ratio", type=float, default=0.5, help="mask ratio")
    parser.add_argument("--mask-kind", choices=("perlin", "uniform"), default="perlin",
                        help="mask noise")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N, cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of batch, masks and weights")
    parser.add_argument("--baseline", default=None,
                        help="model the ratios are taken against (unset: the first vit* model)")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write the figure here (unset: --out with .png, if --out is given)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one eager step of every model and print time per "
                             "record_function label (forward and backward)")
    parser.add_argument("--profile-ops", type=int, default=5, metavar="N",
                        help="with --profile, list each label's N largest ops")
    parser.add_argument("--profile-res", type=int, default=None,
                        help="resolution of the profiled step (unset: the first of --resolutions)")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"name:key=val,key=val" -> (name, overrides); values are Python literals or strings."""
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"model spec {spec!r}: expected KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = val.strip()
    return name.strip(), overrides


def expand_specs(specs: list[str], crossmae: float | None) -> list[str]:
    """Add a CrossMAE-style variant after each model when ``crossmae`` is a ratio."""
    from affmae import create_model, list_models

    if crossmae is None:
        return list(specs)
    names = set(list_models())
    out: list[str] = []
    for spec in specs:
        out.append(spec)
        name, overrides = parse_spec(spec)
        if name.endswith("_crossmae"):
            continue
        tail = "".join(f",{k}={v!r}" for k, v in overrides.items() if k != "pred_ratio")
        if f"{name}_crossmae" in names:
            out.append(f"{name}_crossmae:pred_ratio={crossmae}{tail}")
        elif "pred_ratio" in _config_fields(create_model, name):
            out.append(f"{name}:pred_ratio={crossmae}{tail}")
        else:
            raise ValueError(f"--crossmae: model {name!r} has no CrossMAE variant or pred_ratio")
    return list(dict.fromkeys(out))


def _config_fields(create_model, name: str) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(create_model(name).config)}


def make_batch(res: int, batch: int, ratio: float, kind: str, seed: int, patch: int):
    """The same images and masks for every model at one resolution (CPU tensors)."""
    from affmae.ops.masking import make_mask

    if res % patch:
        raise ValueError(f"resolution {res} is not a multiple of the patch size {patch}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + res)
    imgs = torch.randn(batch, 1, res, res, generator=g)
    is_masked = make_mask(batch, (res // patch, res // patch), ratio, kind=kind, generator=g)
    return imgs, is_masked


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Everything a number needs to be compared (DESIGN 6)."""
    import affmae

    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k != "func"},
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_name()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "affmae": affmae.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "compile": args.compile, "cuda_graph": args.cuda_graph, "mask_ratio": args.mask_ratio, "mask_kind": args.mask_kind,
        "flops_unit": "FLOPs = 2 x MACs (multiply and add counted separately); 'gmacs' matches "
                      "the AFFMAE paper's 'FLOPs (G)'",
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    meta["git_commit"] = source_commit(Path(__file__).parent)
    return meta


# ---------------------------------------------------------------------------------------------
# Measurement of one (model, resolution)
# ---------------------------------------------------------------------------------------------


def bench_one(spec: str, res: int, batch_cpu, args, device: torch.device) -> dict[str, Any]:
    from affmae import create_model

    name, overrides = parse_spec(spec)
    imgs_cpu, mask_cpu = batch_cpu
    row: dict[str, Any] = {
        "model": spec, "name": name, "overrides": overrides, "resolution": res,
        "tokens": int(mask_cpu.shape[1]), "visible_tokens": int((~mask_cpu[0]).sum()),
        "batch": args.batch, "status": "ok",
        "params": None, "gflops": None, "gmacs": None, "flops_by_op": None, "uncounted_ops": None,
        "step_ms": None, "step_ms_all": None, "img_s": None, "peak_mem_gib": None,
        "timer": None, "loss": None,
    }
    if args.compile != "none":
        torch._dynamo.reset()  # fresh static graphs: no recompile limits, no dynamic shapes
    torch.manual_seed(args.seed)
    model = create_model(name, **overrides).to(device).train()
    row["params"] = sum(p.numel() for p in model.parameters())
    imgs, is_masked = imgs_cpu.to(device), mask_cpu.to(device)
    amp = DTYPES[args.dtype]
    failure: str | None = None

    # 1. Forward FLOPs of one sample, under the step's autocast (same kernels as training).
    try:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            fc = count_model_flops(model, imgs[:1], is_masked[:1])
        row.update(gflops=fc.flops / 1e9, gmacs=fc.macs / 1e9, uncounted_ops=fc.uncounted,
                   flops_by_op={k: v / 1e9 for k, v in fc.by_op.items()})
    except Exception as e:  # noqa: BLE001 - reported per row, see module docstring
        failure = "OOM" if _is_oom(e) else _error(spec, res, "FLOP count", e)
    _free(device)

    # 2. Training steps: time and peak memory.
    if failure is None:
        trainer = None
        try:
            trainer = Trainer(model, imgs, is_masked, dtype=args.dtype, compile=args.compile,
                              cuda_graph=args.cuda_graph)
            stats = measure_steps(trainer, steps=args.steps, warmup=args.warmup)
            row.update(step_ms=stats.median_ms, step_ms_all=stats.step_ms,
                       img_s=stats.images_per_s(args.batch), timer=stats.timer,
                       loss=stats.final_loss,
                       peak_mem_gib=(stats.peak_mem_bytes / GIB
                                     if stats.peak_mem_bytes is not None else None))
            if not math.isfinite(stats.final_loss):
                failure = _error(spec, res, "training", FloatingPointError(
                    f"loss is {stats.final_loss}"))
        except Exception as e:  # noqa: BLE001
            failure = "OOM" if _is_oom(e) else _error(spec, res, "training step", e)
        del trainer
    del model, imgs, is_masked
    _free(device)
    if failure is not None:
        row["status"] = failure
    return row


def _compiled(mode: str) -> str:
    return "" if mode == "none" else f", compiled ({mode})"


def _error(spec: str, res: int, what: str, e: BaseException) -> str:
    print(f"affmae bench: {spec} at {res} px, {what} failed:", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def scaling(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: step time vs token count, local log-log slopes and a least-squares exponent
    (step_ms ~ tokens ** exponent; 1 = linear, 2 = quadratic)."""
    out: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["tokens"], r["step_ms"]) for r in rows
                     if r["model"] == m and r["step_ms"] is not None)
        entry: dict[str, Any] = {
            "points": [{"tokens": n, "step_ms": t, "us_per_token": 1000.0 * t / n}
                       for n, t in pts],
            "local_exponents": [math.log(t2 / t1) / math.log(n2 / n1)
                                for (n1, t1), (n2, t2) in zip(pts, pts[1:]) if n2 != n1],
            "exponent": None,
        }
        if len({n for n, _ in pts}) >= 2:
            xs = [math.log(n) for n, _ in pts]
            ys = [math.log(t) for _, t in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            entry["exponent"] = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
                                 / sum((x - mx) ** 2 for x in xs))
        out[m] = entry
    return out


def ratios(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per non-baseline model and resolution: throughput, memory and FLOPs relative to the
    baseline (throughput and memory as model / baseline, FLOPs as baseline / model)."""
    base = {r["resolution"]: r for r in rows if r["model"] == baseline}
    out = []

    def div(a, b):
        return a / b if a is not None and b else None

    for r in rows:
        b = base.get(r["resolution"])
        if r["model"] == baseline or b is None:
            continue
        out.append({"model": r["model"], "baseline": baseline, "resolution": r["resolution"],
                    "throughput_x": div(r["img_s"], b["img_s"]),
                    "memory_x": div(r["peak_mem_gib"], b["peak_mem_gib"]),
                    "flops_fewer_x": div(b["gflops"], r["gflops"])})
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str, na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (f"affmae bench: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
            f"{meta['dtype']}, batch {meta['batch']}, median of {meta['steps']} steps after "
            f"{meta['warmup']} warm-up{_compiled(meta['compile'])}, "
            f"mask {meta['mask_kind']} {meta['mask_ratio']}")
    lines = [head,
             "GFLOPs: forward of 1 sample, multiply+add = 2 FLOPs; GMACs = GFLOPs / 2 "
             "(the paper's 'FLOPs (G)'). Memory: peak of a full step with AdamW state.",
             f"{'model':<34} {'res':>5} {'params M':>9} {'tokens':>7} {'GFLOPs':>9} "
             f"{'GMACs':>9} {'mem GiB':>8} {'step ms':>9} {'img/s':>8}  status"]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def format_row(r: dict[str, Any]) -> str:
    """One model and resolution, as a line of the table."""
    p = None if r["params"] is None else r["params"] / 1e6
    return (f"{r['model']:<34} {r['resolution']:>5} {_fmt(p, '.2f'):>9} {r['tokens']:>7} "
            f"{_fmt(r['gflops'], '.2f'):>9} {_fmt(r['gmacs'], '.2f'):>9} "
            f"{_fmt(r['peak_mem_gib'], '.2f'):>8} {_fmt(r['step_ms'], '.1f'):>9} "
            f"{_fmt(r['img_s'], '.1f'):>8}  {r['status']}")


def _write_json(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` atomically (a temporary file, then a rename)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def format_ratios(rat: list[dict[str, Any]]) -> str:
    if not rat:
        return ""
    lines = [f"relative to {rat[0]['baseline']}: throughput and memory as model / baseline, "
             "FLOPs as baseline / model",
             f"{'model':<34} {'res':>5} {'img/s x':>8} {'memory x':>9} {'FLOPs fewer x':>14}"]
    for q in rat:
        lines.append(f"{q['model']:<34} {q['resolution']:>5} {_fmt(q['throughput_x'], '.2f'):>8} "
                     f"{_fmt(q['memory_x'], '.2f'):>9} {_fmt(q['flops_fewer_x'], '.2f'):>14}")
    return "\n".join(lines)


def format_scaling(sc: dict[str, dict[str, Any]]) -> str:
    lines = ["step time vs tokens per image (step_ms ~ tokens^exponent):",
             f"{'model':<34} {'exponent':>9}  local exponents / us per token"]
    for m, e in sc.items():
        local = ", ".join(f"{x:.2f}" for x in e["local_exponents"]) or "-"
        per = ", ".join(f"{p['tokens']}:{p['us_per_token']:.2f}" for p in e["points"]) or "-"
        lines.append(f"{m:<34} {_fmt(e['exponent'], '.2f'):>9}  [{local}]  {per}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    for name in ("batch", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    device = resolve_device(args.device)
    specs = expand_specs(args.models, args.crossmae)
    from affmae import create_model

    for spec in specs:  # fail fast on unknown names and bad overrides, before any measurement
        name, overrides = parse_spec(spec)
        create_model(name, **overrides)
    meta = environment(args, device)
    meta["models"] = specs

    batches = {res: make_batch(res, args.batch, args.mask_ratio, args.mask_kind, args.seed, 8)
               for res in args.resolutions}
    rows = []
    todo = [(s, r) for s in specs for r in args.resolutions]
    for spec, res in tqdm(todo, desc="affmae bench", file=sys.stderr, disable=None):
        rows.append(bench_one(spec, res, batches[res], args, device))
        # each result as it comes (stderr; stdout gets the table at the end), and the JSON so
        # far: a run stopped at a later size keeps what it measured ("complete": false)
        tqdm.write(format_row(rows[-1]), file=sys.stderr)
        sys.stderr.flush()
        if args.out is not None:
            _write_json(args.out, {"meta": meta, "results": rows, "complete": False})

    baseline = args.baseline or next((s for s in specs if parse_spec(s)[0].startswith("vit")),
                                     None)
    rat = ratios(rows, baseline) if baseline else []
    sc = scaling(rows)
    print(format_table(rows, meta))
    uncounted = sorted({op for r in rows for op in (r["uncounted_ops"] or [])})
    if uncounted:
        print(f"WARNING: ops without a FLOP formula (counted as 0): {', '.join(uncounted)}")
    if rat:
        print()
        print(format_ratios(rat))
    print()
    print(format_scaling(sc))

    profiles = []
    if args.profile:
        res = args.profile_res or args.resolutions[0]
        imgs_cpu, mask_cpu = batches.get(res) or make_batch(
            res, args.batch, args.mask_ratio, args.mask_kind, args.seed, 8)
        for spec in specs:
            prof = _profile_one(spec, res, imgs_cpu, mask_cpu, args, device)
            profiles.append(prof)
            print()
            print(f"profile: {spec} at {res} px, batch {args.batch}, {args.dtype}, eager")
            print(prof.get("text") or prof["status"])

    result = {"meta": meta, "results": rows, "ratios": rat, "scaling": sc, "profiles": profiles,
              "complete": True}
    if args.out is not None:
        _write_json(args.out, result)
        print(f"\nwrote {args.out}")
    plot_path = args.plot or (args.out.with_suffix(".png") if args.out is not None else None)
    if plot_path is not None:
        title = (f"{meta['device_name']}, {args.dtype}, batch {args.batch}"
                 f"{_compiled(args.compile)}")
        plot_results(rows, plot_path, title=title)
        print(f"wrote {plot_path}")
    errors = [r for r in rows if r["status"].startswith("error")]
    errors += [p for p in profiles if p["status"].startswith("error")]
    return 1 if errors else 0


def _profile_one(spec, res, imgs_cpu, mask_cpu, args, device) -> dict[str, Any]:
    from affmae import create_model

    name, overrides = parse_spec(spec)
    out: dict[str, Any] = {"model": spec, "resolution": res, "status": "ok"}
    trainer = model = None
    try:
        torch.manual_seed(args.seed)
        model = create_model(name, **overrides).to(device)
        trainer = Trainer(model, imgs_cpu.to(device), mask_cpu.to(device), dtype=args.dtype)
        rows, wall_ms = profile_step(trainer, warmup=max(1, min(args.warmup, 3)))
        out["wall_ms"] = wall_ms
        out["rows"] = [{"label": r.label, "calls": r.calls, "fwd_ms": r.fwd_ms,
                        "bwd_ms": r.bwd_ms, "total_ms": r.total_ms} for r in rows]
        out["text"] = format_profile(rows, wall_ms, on_device=device.type == "cuda",
                                     top_ops=args.profile_ops)
        for r, d in zip(rows, out["rows"]):
            d["ops"] = r.ops
    except Exception as e:  # noqa: BLE001
        out["status"] = "OOM" if _is_oom(e) else _error(spec, res, "profile", e)
    del trainer, model
    _free(device)
    return out


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m affmae.bench.cli``); ``affmae bench`` is the usual one."""
    parser = argparse.ArgumentParser(prog="affmae bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
