"""Where a training step's activation memory goes: the tensors autograd saves for the backward.

    python -m affmae.bench.memory --models aff_small vit_small --resolutions 512 768 --batch 2

The peak of a training step is parameters + gradients + optimiser state (fixed) + the tensors
the forward saves for the backward (growing with batch and resolution). This tool measures the
last part, on any device (a CPU will do: bytes do not depend on the device), by component:

1. ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor saved for the backward, with
   its storage. Each storage is counted once (a tensor saved by two ops, or a view of a saved
   tensor, costs its memory once), at its full ``nbytes``; parameters are not activations and
   are left out.
2. Forward hooks on every module keep a stack of the modules running; a saved tensor belongs to
   the innermost one. Rows group modules by ``group_depth`` leading name parts (e.g.
   ``encoder.stages.2``: every block of stage 3) and by the innermost module's class.

Caveats, said in the output: work done outside any submodule (AFF's clustering and neighbour
search run in ``AFFEncoder.forward``) is attributed to the parent module; the inputs that a
block run under gradient checkpointing (``grad_checkpoint``) keeps for its recomputation are not
saved through autograd and are not counted (one (B, N, C) tensor per block); and on a CPU the
cluster attention runs the PyTorch reference, which saves its gathered keys and (B, H, N, K)
probabilities, while the Triton kernel on CUDA saves only q, k, v and one fp32 row statistic per
query and head, and the decoder's point gather (in ``DeformableAttention``) runs
``F.embedding_bag`` in float32 instead of the Triton gather: on CUDA those rows are smaller.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from affmae.bench.step import DTYPES


# Modules whose CPU path is a PyTorch reference that saves more than their CUDA (Triton) path.
REFERENCE_ON_CPU = ("ClusterAttention", "DeformableAttention")


@dataclass
class SavedBytes:
    """Bytes of saved activations of one forward pass."""

    total: int = 0
    by_group: dict[str, int] = field(default_factory=dict)  # module-name prefix -> bytes
    by_kind: dict[str, int] = field(default_factory=dict)  # innermost module class -> bytes


def _group(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth]) if name else "(model)"


def saved_activation_bytes(model: nn.Module, forward, group_depth: int = 3) -> SavedBytes:
    """Run ``forward()`` (a closure calling ``model``; it must build the graph, i.e. not under
    ``no_grad``) and attribute the bytes of every saved tensor to the innermost module."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    names = {m: n for n, m in model.named_modules()}
    running: list[nn.Module] = []  # modules whose forward is running, innermost last
    seen: set[int] = set()
    out = SavedBytes()
    by_group: dict[str, int] = defaultdict(int)
    by_kind: dict[str, int] = defaultdict(int)

    def pre(module, _inputs):
        running.append(module)

    def post(_module, _inputs, _output):
        running.pop()

    def pack(t: torch.Tensor):
        if t.layout is torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in seen and ptr not in param_storages and storage.nbytes() > 0:
                seen.add(ptr)
                n = storage.nbytes()
                owner = running[-1] if running else None
                out.total += n
                by_group[_group(names[owner] if owner is not None else "", group_depth)] += n
                by_kind[type(owner).__name__ if owner is not None else "(none)"] += n
        return t

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in handles:
            h.remove()
    out.by_group = dict(sorted(by_group.items(), key=lambda kv: -kv[1]))
    out.by_kind = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
    return out


def measure(spec: str, res: int, batch: int, dtype: str, device: torch.device,
            ratio: float = 0.5, seed: int = 0) -> dict:
    """Saved activations of one pretraining forward (with its loss) of a registered model."""
    from affmae import create_model
    from affmae.bench.cli import make_batch, parse_spec

    name, overrides = parse_spec(spec)
    torch.manual_seed(seed)
    model = create_model(name, **overrides).to(device).train()
    imgs, is_masked = make_batch(res, batch, ratio, "perlin", seed, int(model.patch_size))
    imgs, is_masked = imgs.to(device), is_masked.to(device)
    amp = DTYPES[dtype]

    def forward():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model(imgs, is_masked)["loss"]

    saved = saved_activation_bytes(model, forward)
    return {"model": spec, "res": res, "batch": batch, "dtype": dtype, "device": str(device),
            "params": sum(p.numel() for p in model.parameters()),
            "saved_bytes": saved.total, "by_group": saved.by_group, "by_kind": saved.by_kind}


def _mib(n: int) -> str:
    return f"{n / 2**20:9.1f}"


def format_result(r: dict, top: int = 12) -> str:
    per = r["saved_bytes"] / r["batch"]
    lines = [f"{r['model']} at {r['res']} px, batch {r['batch']}, {r['dtype']} on {r['device']}: "
             f"{r['saved_bytes'] / 2**20:.1f} MiB saved for the backward "
             f"({per / 2**20:.1f} MiB per image)",
             "  MiB        share  module group"]
    for g, n in list(r["by_group"].items())[:top]:
        lines.append(f"  {_mib(n)}  {100 * n / r['saved_bytes']:5.1f}%  {g}")
    lines.append("  MiB        share  innermost module class")
    for k, n in list(r["by_kind"].items())[:top]:
        lines.append(f"  {_mib(n)}  {100 * n / r['saved_bytes']:5.1f}%  {k}")
    reference = [k for k in REFERENCE_ON_CPU if k in r["by_kind"]]
    if reference and not r["device"].startswith("cuda"):
        lines.append(f"  ({', '.join(reference)}: the PyTorch reference paths of a CPU; the "
                     "Triton kernels on CUDA save less)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m affmae.bench.memory",
                                description="saved-activation bytes of one training forward, "
                                "by model component (any device)")
    p.add_argument("--models", nargs="+", default=["aff_small", "vit_small"],
                   help="registered models, optionally with overrides as in affmae bench "
                   "(e.g. aff_small:pred_ratio=0.5)")
    p.add_argument("--resolutions", nargs="+", type=int, default=[512], metavar="PX")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16",
                   help="autocast dtype of the forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, metavar="JSON", help="also write the results here")
    args = p.parse_args(argv)
    if args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    device = torch.device(args.device)
    results = []
    for res in args.resolutions:
        for spec in args.models:
            r = measure(spec, res, args.batch, args.dtype, device)
            results.append(r)
            print(format_result(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
