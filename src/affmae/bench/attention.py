"""Cluster attention benchmark: Triton kernel vs PyTorch reference vs FlexAttention (issue 3).

``python -m affmae.bench.attention [--out results.json] [--sweep]``

For the four stages of aff_small (heads 3, 6, 12, 16; head dim 32; m = 8; Kc = 8) at 512 and
768 px with mask ratio 0.5 and d_s = 0.4 (tokens 2048 / 819 / 327 / 130 and 4608 / 1843 / 737 /
294), batch 16, bf16: forward and forward + backward time (``triton.testing.do_bench`` median, L2
flushed between runs), the same inside a CUDA graph (``do_bench_cudagraph``: device time without
the host's launch overhead; not for FlexAttention), peak memory of forward + backward
(``torch.cuda.max_memory_allocated`` above the inputs), and the Triton kernel's achieved bandwidth
(over its CUDA-graph time) as a percentage of a measured device-to-device copy (read + write
bytes / time). Results: docs/BENCHMARKS.md, section "Cluster attention kernel".

Implementations (one function, same inputs):
- ``triton``: ``cluster_attention(backend="triton")`` (the kernels and autograd Function the
  model uses; the model passes q, k, v packed, ``cluster_attention_packed``, which saves the
  one stack of their three gradients that these unpacked calls still pay). An isolated call
  builds its two group structures itself; ``triton_shared`` takes them prebuilt, as each
  attention block of a stage does in the model (one build per stage).
- ``torch``: ``cluster_attention_ref`` (gather, matmul, softmax).
- ``flex``: ``torch.nn.attention.flex_attention`` compiled: the blank key / value appended as key
  N, a block mask from the cluster adjacency (mask_mod: key cluster in nbr[query cluster], key
  valid, or the blank key) and a score_mod adding the relative-position bias (learnable, captured
  tensors). Its block mask is built outside the timed region (``flex_mask_ms`` reports that cost,
  which a training step pays once per batch and stage). ``flex_nograd``: the same with the bias
  weights detached (FlexAttention's backward for learnable captured tensors is its slow path).

Dense windows (``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``; not the same function, a
yardstick for the bandwidth target): ``scaled_dot_product_attention`` with one backend forced, over
the stage's tokens cut into fixed windows of Kc * m = 64 consecutive tokens (the first
64 * floor(N / 64)), so each query attends to 64 keys as in cluster attention, but with no bias,
blank key, gather or masking. Same dtype, batch, heads and head dim; q, k, v strided views of one
packed tensor. Their bandwidth counts the same bytes (q, k, v, out, log-sum-exp; dO, dq, dk, dv)
for their token count, without positions and neighbour lists: what the best dense attention
kernels reach on this traffic.

Bandwidth: the minimum bytes any implementation must move. Forward: read q, k, v, positions,
neighbour lists; write out and the float32 log-sum-exp. Backward: read q, k, v, dO, log-sum-exp,
positions, neighbour lists; write dq, dk, dv. Gathered neighbour reads beyond the first are not
counted (they hit L2 in a good kernel), so 100 % is the copy ceiling for this traffic.

Eager columns: at these sizes both implementations are bound by the host (Python, launches,
autograd), not the GPU. By default autograd runs a CUDA backward on its own device (worker)
thread, and the handoff to it and back costs most when that thread sits on another core than the
caller: an H100 host measured the Triton call 2x faster, and the reference 1.2-1.6x, with the
process pinned to one core (docs/BENCHMARKS.md, session 15). ``--backward-thread caller`` (the
default) runs every backward on the calling thread instead
(``affmae.devices.backward_on_calling_thread``), as the package's trainer does;
``--backward-thread worker`` keeps PyTorch's default. Both implementations are timed alike, and
the JSON's meta records the mode. Compare eager numbers only from runs in the same mode.

Token positions: random distinct cells of the patch grid (uniform mask; each stage a random subset
of the previous one), clustered with ``balanced_clustering`` as the encoder does.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

from affmae.bench.provenance import source_commit
from affmae.bench.timing import time_op
from affmae.devices import backward_on_calling_thread
from affmae.ops.cluster_attention import cluster_attention
from affmae.ops.cluster_attention.reference import cluster_attention_ref
from affmae.ops.clustering import balanced_clustering, gather_tokens, pad_tokens

PATCH = 8
WIDTHS = (96, 192, 384, 512)
HEADS = (3, 6, 12, 16)
MASK_RATIO = 0.5
D_S = 0.4


def stage_tokens(res: int) -> list[int]:
    """Visible tokens per stage: (res / P)^2 * (1 - r), then floor(N * d_s) per downsampling."""
    n = int((res // PATCH) ** 2 * (1 - MASK_RATIO))
    out = [n]
    for _ in range(3):
        n = int(math.floor(n * D_S))
        out.append(n)
    return out


def make_stage(res: int, stage: int, batch: int, dtype: torch.dtype, device, m: int = 8, Kc: int = 8,
               seed: int = 0) -> dict:
    """Inputs of one stage: clustered q, k, v, positions, neighbourhoods, bias and blank params."""
    g = torch.Generator().manual_seed(seed + stage)
    side = res // PATCH
    counts = stage_tokens(res)
    n = counts[stage]
    cells = torch.stack([torch.randperm(side * side, generator=g)[:n] for _ in range(batch)])
    pos = torch.stack([cells % side, cells // side], dim=-1).float().to(device)  # (B, n, 2)
    cl = balanced_clustering(pos, (side, side), m=m, num_nbr_clusters=Kc)
    M = cl.num_clusters
    N = M * m
    pos_c = pad_tokens(gather_tokens(pos, cl.perm), N).contiguous()  # (B, N, 2)
    H = HEADS[stage]
    D = WIDTHS[stage] // H
    qkv = torch.randn(batch, N, 3, H, D, generator=g).to(device=device, dtype=dtype)  # (B, N, 3, H, D)
    q, k, v = qkv.unbind(2)  # strided views, as a fused qkv projection gives them
    params = [
        (0.3 * torch.randn(H, 5, generator=g)).to(device), torch.randn(H, generator=g).to(device),
        torch.randn(H, D, generator=g).to(device), torch.randn(H, D, generator=g).to(device),
    ]
    do = torch.randn(batch, N, H, D, generator=g).to(device=device, dtype=dtype)
    return dict(q=q, k=k, v=v, pos=pos_c, nbr=cl.nbr, n_valid=n, params=params, do=do,
                B=batch, N=N, M=M, H=H, D=D, m=m, Kc=cl.nbr.shape[-1])


# ------------------------------------------------------------------------------------------------
# Implementations: each returns fn(q, k, v, *params) -> out for one stage's fixed pos / nbr.
# ------------------------------------------------------------------------------------------------


def triton_impl(s, shared: bool = False):
    """The Triton backend; ``shared``: with the group structures built once, outside the call."""
    groups = None
    if shared:
        from affmae.ops.cluster_attention.kernel import attention_groups

        groups = (attention_groups(s["nbr"], s["m"]), attention_groups(s["nbr"], s["m"], True))
    return lambda q, k, v, *p: cluster_attention(q, k, v, s["pos"], s["nbr"], s["n_valid"], *p,
                                                 backend="triton", groups=groups)


def torch_impl(s):
    return lambda q, k, v, *p: cluster_attention_ref(q, k, v, s["pos"], s["nbr"], s["n_valid"], *p)


SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION"}


def window_stage(s, window: int | None = None) -> dict:
    """Inputs of the dense-window yardstick (module docstring) for stage ``s``: its batch, heads,
    head dim and dtype, the first ``window * floor(N / window)`` tokens (window = Kc * m)."""
    B, H, D = s["B"], s["H"], s["D"]
    W = window or s["Kc"] * s["m"]
    n = (s["N"] // W) * W
    if n == 0:
        raise ValueError(f"a stage of N={s['N']} tokens has no full window of {W}")
    g = torch.Generator().manual_seed(1)
    dev, dtype = s["q"].device, s["q"].dtype
    qkv = torch.randn(B, n, 3, H, D, generator=g).to(device=dev, dtype=dtype)
    q, k, v = qkv.unbind(2)
    do = torch.randn(B, n, H, D, generator=g).to(device=dev, dtype=dtype)
    return dict(q=q, k=k, v=v, do=do, params=[], B=B, N=n, H=H, D=D, W=W)


def sdpa_impl(w, backend: str | None):
    """fn(q, k, v) -> out: ``scaled_dot_product_attention`` within windows of ``w["W"]`` tokens,
    with the named ``torch.nn.attention.SDPBackend`` forced (None: PyTorch's choice)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, n, H, D, W = w["B"], w["N"], w["H"], w["D"], w["W"]

    def win(t):  # (B, n, H, D) -> (B * n / W, H, W, D), a view
        return t.reshape(B * n // W, W, H, D).transpose(1, 2)

    def fn(q, k, v, *_params):
        if backend is None:
            out = F.scaled_dot_product_attention(win(q), win(k), win(v))
        else:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                out = F.scaled_dot_product_attention(win(q), win(k), win(v))
        return out.transpose(1, 2).reshape(B, n, H, D)

    return fn


def window_bytes(B: int, n: int, H: int, D: int, elt: int) -> tuple[int, int]:
    """``min_bytes`` of the dense-window yardstick over n tokens: the same tensors, no positions
    or neighbour lists."""
    tensor = B * n * H * D * elt
    lse = B * H * n * 4
    return 4 * tensor + lse, 7 * tensor + lse


def flex_impl(s, bias_grad: bool = True):
    """FlexAttention over the same neighbourhoods; returns (fn, mask build time in ms).

    bias_grad=False detaches the bias weights (no gradient for them): FlexAttention's backward
    through learnable captured tensors is its slow path, this shows its time without it."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, N, M, m, n_valid = s["B"], s["N"], s["M"], s["m"], s["n_valid"]
    dev = s["q"].device
    # Cluster adjacency with the blank key as cluster M (always attended).
    adj = torch.zeros(B, M + 1, M + 1, dtype=torch.bool, device=dev)
    adj.scatter_(2, s["nbr"], True)
    adj[:, :, M] = True
    pos_ext = torch.cat([s["pos"], s["pos"].new_zeros(B, 1, 2)], dim=1)  # (B, N+1, 2)

    def mask_mod(b, h, q_idx, kv_idx):
        return adj[b, q_idx // m, kv_idx // m] & ((kv_idx < n_valid) | (kv_idx == N))

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, B, None, N, N + 1, device=dev)  # 128 x 128 blocks
    torch.cuda.synchronize()
    mask_ms = (time.perf_counter() - t0) * 1e3
    flex = torch.compile(flex_attention)
    # Every stage is a new shape and closure; allow the recompiles instead of silently falling
    # back to the unfused (materialising) path after the default limit of 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)

    px, py = pos_ext[..., 0].contiguous(), pos_ext[..., 1].contiguous()  # (B, N+1)
    px2, py2 = px.clone(), py.clone()

    def fn(q, k, v, w, wb, bk, bv):
        H, D = q.shape[2], q.shape[3]
        # FlexAttention differentiates a captured tensor only if score_mod indexes it once:
        # one tensor per weight column.
        if not bias_grad:
            w, wb = w.detach(), wb.detach()
        w0, w1, w2, w3, w4 = (w[:, i].contiguous() for i in range(5))

        def score_mod(score, b, h, q_idx, kv_idx):
            dx = px[b, kv_idx] - px2[b, q_idx]
            dy = py[b, kv_idx] - py2[b, q_idx]
            r = torch.sqrt(dx * dx + dy * dy)
            inv = torch.where(r > 0, 1.0 / torch.clamp(r, min=1e-12), 0.0)
            bias = w0[h] * dx + w1[h] * dy + w2[h] * r + (w3[h] * dx + w4[h] * dy) * inv + wb[h]
            return score + torch.where(kv_idx < N, bias, 0.0)

        blank = lambda t: t.to(q.dtype).view(1, 1, H, D).expand(q.shape[0], 1, H, D)  # noqa: E731
        kx = torch.cat([k, blank(bk)], dim=1).transpose(1, 2)  # (B, H, N+1, D)
        vx = torch.cat([v, blank(bv)], dim=1).transpose(1, 2)
        out = flex(q.transpose(1, 2), kx, vx, score_mod=score_mod, block_mask=block_mask)  # (B, H, N, D)
        return out.transpose(1, 2)  # (B, N, H, D)

    return fn, mask_ms


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def _leaves(s):
    qkv = [t.detach().clone().requires_grad_() for t in (s["q"], s["k"], s["v"])]
    params = [p.detach().clone().requires_grad_() for p in s["params"]]
    return qkv + params


def measure(fn, s, graph: bool = False) -> dict:
    """Forward and forward + backward median time (ms), peak extra memory of fwd + bwd (MiB).

    graph: also time both inside a CUDA graph (``do_bench_cudagraph``): GPU time alone, without
    the host's launch overhead, which a training step overlaps with earlier GPU work.
    """
    leaves = _leaves(s)
    do = s["do"]

    def step():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, do, allow_unused=True)  # flex_nograd leaves w, wb unused

    return time_op(lambda: fn(*leaves), step, graph)


def min_bytes(s, elt: int) -> tuple[int, int]:
    """Minimum bytes moved by the forward and by the backward (see module docstring)."""
    B, N, H, D, M, Kc = s["B"], s["N"], s["H"], s["D"], s["M"], s["Kc"]
    tensor = B * N * H * D * elt
    small = B * N * 2 * 4 + B * M * Kc * s["nbr"].element_size()
    lse = B * H * N * 4
    return 4 * tensor + small + lse, 7 * tensor + small + lse


def copy_ceiling_gbs(device) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    from triton.testing import do_bench

    n = 1 << 28  # 256 MiB
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9


SWEEP = ((1, 32), (2, 16), (2, 32), (2, 64), (4, 32))  # (clusters per program, keys per tile)


def sweep_triton(s) -> dict:
    """Tilings of the raw kernels (clusters per program G, keys per tile; group structures
    prebuilt): forward and backward GPU time in CUDA graphs, and the structures' build."""
    from triton.testing import do_bench_cudagraph as do_bench

    from affmae.ops.cluster_attention import kernel

    args = (s["q"], s["k"], s["v"], s["pos"], s["nbr"], s["n_valid"], *s["params"], s["D"] ** -0.5)
    out = {}
    for G, bk in SWEEP:
        grp = kernel.group_neighbourhood(s["nbr"], G)
        grp_t = kernel.group_neighbourhood(s["nbr"], G, transpose=True)
        kw = dict(group=G, block_k=bk)
        o, lse = kernel.attention_forward(*args, grp=grp, **kw)
        bwd_args = (s["do"], *args[:3], o, lse, *args[3:])
        out[f"fwd_G{G}_k{bk}_ms"] = do_bench(lambda: kernel.attention_forward(*args, grp=grp, **kw),
                                             return_mode="median")
        out[f"bwd_G{G}_k{bk}_ms"] = do_bench(
            lambda: kernel.attention_backward(*bwd_args, grp=grp, grp_t=grp_t, **kw), return_mode="median")
        out[f"build_G{G}_ms"] = do_bench(lambda: (kernel.group_neighbourhood(s["nbr"], G),
                                                  kernel.group_neighbourhood(s["nbr"], G, True)),
                                         return_mode="median")
    return out


BACKWARD_THREADS = ("caller", "worker")


def run(resolutions, batch, dtype_name, impls, sweep, log, out_path=None,
        backward_thread: str = "caller") -> dict:
    """Measure every stage of every resolution; the JSON at ``out_path`` is rewritten after each row.
    ``backward_thread``: "caller" runs the backwards on this thread, "worker" on autograd's
    device thread (module docstring, eager columns)."""
    if backward_thread not in BACKWARD_THREADS:
        raise ValueError(f"backward_thread must be one of {BACKWARD_THREADS}, got {backward_thread!r}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    dev = torch.device("cuda")
    import triton

    meta = dict(
        device=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), dtype=dtype_name, batch=batch, command=" ".join(sys.argv),
        copy_ceiling_gbs=copy_ceiling_gbs(dev), git_commit=source_commit(),
        backward_thread=backward_thread,
    )
    log(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, copy ceiling "
        f"{meta['copy_ceiling_gbs']:.0f} GB/s, backward on the {backward_thread} thread")
    threads = (backward_on_calling_thread if backward_thread == "caller"
               else lambda: torch.autograd.set_multithreading_enabled(True))
    rows = []
    for res in resolutions:
        for stage in range(4):
            s = make_stage(res, stage, batch, dtype, dev)
            row = dict(res=res, stage=stage + 1, tokens=s["n_valid"], N=s["N"], heads=s["H"], D=s["D"], Kc=s["Kc"])
            for name in impls:
                try:
                    timed_stage = s
                    if name.startswith("sdpa"):
                        timed_stage = window_stage(s)
                        row["window_tokens"] = timed_stage["N"]
                        fn = sdpa_impl(timed_stage, SDPA_BACKENDS[name])
                    elif name.startswith("flex"):
                        fn, row["flex_mask_ms"] = flex_impl(s, bias_grad=name == "flex")
                    elif name == "torch":
                        fn = torch_impl(s)
                    else:
                        fn = triton_impl(s, shared=name == "triton_shared")
                    with threads():
                        timed = measure(fn, timed_stage, graph=not name.startswith("flex"))
                    for key, val in timed.items():
                        row[f"{name}_{key}"] = val
                except Exception as e:  # recorded in the table, the other implementations go on
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                torch.cuda.empty_cache()
            fb, bb = min_bytes(s, s["q"].element_size())
            ceil = meta["copy_ceiling_gbs"] * 1e9
            for name in ("triton", "triton_shared", *SDPA_BACKENDS):  # GPU time vs the copy ceiling
                if name in SDPA_BACKENDS and "window_tokens" in row:
                    fb, bb = window_bytes(s["B"], row["window_tokens"], s["H"], s["D"], s["q"].element_size())
                if f"{name}_fwd_graph_ms" in row:
                    row[f"{name}_fwd_bw_pct"] = 100 * fb / (row[f"{name}_fwd_graph_ms"] * 1e-3) / ceil
                    row[f"{name}_fwdbwd_bw_pct"] = (100 * (fb + bb) / (row[f"{name}_fwdbwd_graph_ms"] * 1e-3)
                                                    / ceil)
            if sweep:
                row.update({f"sweep_{k}": v for k, v in sweep_triton(s).items()})
            rows.append(row)
            log(format_row(row, impls))
            result = dict(meta=meta, rows=rows, summary=summarise(rows, impls))
            if out_path:
                with open(out_path, "w") as f:
                    json.dump(result, f, indent=1)
    return result


def summarise(rows, impls) -> dict:
    """Totals over the four stages of each resolution (one attention call per stage)."""
    out = {}
    for res in sorted({r["res"] for r in rows}):
        rs = [r for r in rows if r["res"] == res]
        tot = {}
        for name in impls:
            for key in ("fwd_ms", "fwdbwd_ms", "fwd_graph_ms", "fwdbwd_graph_ms"):
                vals = [r.get(f"{name}_{key}") for r in rs]
                if all(v is not None for v in vals):
                    tot[f"{name}_{key}"] = sum(vals)
            peaks = [r.get(f"{name}_peak_mib") for r in rs]
            if all(v is not None for v in peaks):
                tot[f"{name}_peak_mib_max"] = max(peaks)
        for name, tag in (("triton", ""), ("triton_shared", "_shared")):
            if "torch_fwdbwd_ms" in tot and f"{name}_fwdbwd_ms" in tot:
                tot[f"speedup{tag}_fwdbwd_vs_torch"] = tot["torch_fwdbwd_ms"] / tot[f"{name}_fwdbwd_ms"]
                tot[f"memory_ratio{tag}_vs_torch"] = tot[f"{name}_peak_mib_max"] / tot["torch_peak_mib_max"]
            if "torch_fwdbwd_graph_ms" in tot and f"{name}_fwdbwd_graph_ms" in tot:
                tot[f"speedup{tag}_fwdbwd_graph_vs_torch"] = (tot["torch_fwdbwd_graph_ms"]
                                                               / tot[f"{name}_fwdbwd_graph_ms"])
        out[str(res)] = tot
    return out


def format_row(r, impls) -> str:
    parts = [f"{r['res']}px s{r['stage']} N={r['tokens']:5d} H={r['heads']:2d}"]
    for name in impls:
        if f"{name}_error" in r:
            parts.append(f"{name}: ERROR {r[f'{name}_error'][:60]}")
            continue
        graph = f" (GPU {r[f'{name}_fwd_graph_ms']:.3f} / {r[f'{name}_fwdbwd_graph_ms']:.3f})" if (
            f"{name}_fwd_graph_ms" in r) else ""
        parts.append(
            f"{name}: fwd {r[f'{name}_fwd_ms']:.3f} fwd+bwd {r[f'{name}_fwdbwd_ms']:.3f} ms{graph} "
            f"{r[f'{name}_peak_mib']:.0f} MiB"
        )
    for name in ("triton", "triton_shared", *SDPA_BACKENDS):
        if f"{name}_fwd_bw_pct" in r:
            parts.append(f"{name} bw {r[f'{name}_fwd_bw_pct']:.0f}% / {r[f'{name}_fwdbwd_bw_pct']:.0f}%")
    return " | ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON to this path")
    ap.add_argument("--res", type=int, nargs="+", default=[512, 768], help="image sizes (px)")
    ap.add_argument("--batch", type=int, default=16, help="batch size")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="q, k, v dtype")
    ap.add_argument("--impl", nargs="+", default=["triton", "triton_shared", "torch", "flex", "flex_nograd"],
                    choices=("triton", "triton_shared", "torch", "flex", "flex_nograd", *SDPA_BACKENDS),
                    help="implementations (flex_nograd: FlexAttention with the bias weights detached; "
                         "sdpa_*: the dense-window yardstick, see the module docstring)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the raw kernels at other tilings (clusters per program, keys per tile)")
    ap.add_argument("--backward-thread", choices=BACKWARD_THREADS, default="caller",
                    help="run backwards on the calling thread (as the trainer does) or on "
                         "autograd's device worker thread (PyTorch's default)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("the attention benchmark needs a CUDA GPU")
    result = run(args.res, args.batch, args.dtype, args.impl, args.sweep, log=print, out_path=args.out,
                 backward_thread=args.backward_thread)
    for res, tot in result["summary"].items():
        print(f"# {res}px totals: " + ", ".join(f"{k} {v:.3f}" for k, v in tot.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
