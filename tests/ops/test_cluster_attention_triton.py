"""Triton cluster attention vs the PyTorch reference (issue 3; STYLE.md "tests that can fail").

Three-way rule (flash-attention's tests): for the output and every gradient, the kernel's error
against a float64 evaluation of the reference (same rounded inputs) must be within ``FACTOR`` times
the error of the reference run at the kernel's precision, plus a tiny floor relative to the value.

CPU: the kernels run through Triton's interpreter. TRITON_INTERPRET=1 must be set before triton is
first imported (triton.language wraps its own functions at import), so all interpreter cases run
in one subprocess (``python this_file.py --worker out.json``) and the tests here check its results;
nothing in this process depends on import order. Interpreter-specific: bfloat16 products are
widened to float32 (exact) because the interpreter multiplies bfloat16 as integers, and its
float32 -> bfloat16 casts truncate instead of rounding (hence ``FACTOR`` 3, not 2).
GPU (``@pytest.mark.gpu``): full aff_small stage sizes in bf16 / fp16, large
logits, torch.compile (fullgraph), a whole aff_small training step on either backend, and the
packed-qkv entry against unbound q, k, v (bitwise).
"""

from __future__ import annotations

import sys

import pytest
import torch
from kernel_checks import (DTYPES, FACTOR, FLOOR, assert_three_way, error_rows, result,
                           run_interpreter, write_results)

from affmae.ops.cluster_attention import cluster_attention, cluster_attention_packed, why_not_triton
from affmae.ops.cluster_attention.reference import cluster_attention_ref
from affmae.ops.clustering import balanced_clustering, gather_tokens, pad_tokens

NAMES = ("out", "dq", "dk", "dv", "d_bias_weight", "d_bias_bias", "d_blank_k", "d_blank_v")


# ------------------------------------------------------------------------------------------------
# Inputs and the three-way comparison (shared by the interpreter worker and the GPU tests)
# ------------------------------------------------------------------------------------------------


def make_inputs(B, n_valid, m, H, D, Kc, seed=0, device="cpu", repeat_nbr=False, fused_qkv=False,
                logit_gain=1.0):
    """Clustered float32 inputs of the reference's signature from random grid positions.

    repeat_nbr: neighbourhoods of Kc clusters drawn with repeats (Kc may exceed M).
    fused_qkv: q, k, v are strided views of one (B, N, 3, H, D) tensor, as a fused projection gives.
    """
    g = torch.Generator().manual_seed(seed)
    side = max(4, int((3 * n_valid) ** 0.5) + 1)
    cells = torch.stack([torch.randperm(side * side, generator=g)[:n_valid] for _ in range(B)])
    pos = torch.stack([cells % side, cells // side], dim=-1).float()  # (B, n, 2) distinct cells
    cl = balanced_clustering(pos, (side, side), m=m, num_nbr_clusters=Kc)
    M = cl.num_clusters
    N = M * m
    pos_c = pad_tokens(gather_tokens(pos, cl.perm), N)  # (B, N, 2)
    nbr = cl.nbr
    if repeat_nbr:
        rest = torch.randint(0, M, (B, M, Kc - 1), generator=g)
        nbr = torch.cat([torch.arange(M).view(1, M, 1).expand(B, M, 1), rest], dim=2)  # (B, M, Kc)
    qkv = torch.randn(B, N, 3, H, D, generator=g)  # (B, N, 3, H, D)
    qkv[:, :, :2] *= logit_gain
    if fused_qkv:
        q, k, v = qkv.unbind(2)
    else:
        q, k, v = (t.contiguous() for t in qkv.unbind(2))
    params = (
        0.3 * torch.randn(H, 5, generator=g), torch.randn(H, generator=g),
        torch.randn(H, D, generator=g), torch.randn(H, D, generator=g),
    )
    do = torch.randn(B, N, H, D, generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    return dict(
        q=to(q), k=to(k), v=to(v), pos=to(pos_c), nbr=to(nbr), n_valid=n_valid,
        params=tuple(map(to, params)), do=to(do),
    )


def _run(fn, inp, dtype, param_dtype):
    """Output and the 7 gradients of fn at the given precision (inputs rounded to dtype)."""
    # Fresh leaves every call (``.to`` returns the same tensor when the dtype already matches).
    q, k, v = (inp[n].to(dtype, copy=True).requires_grad_() for n in "qkv")
    params = [p.to(param_dtype, copy=True).requires_grad_() for p in inp["params"]]
    pos = inp["pos"].to(param_dtype)
    out = fn(q, k, v, pos, inp["nbr"], inp["n_valid"], *params)
    out.backward(inp["do"].to(out.dtype))
    return [out.detach()] + [t.grad for t in (q, k, v, *params)]


def three_way(inp, dtype, kernel_fn):
    """Per output/gradient: (kernel error, same-precision reference error, max |float64 value|)."""
    # Round q, k, v, dO to dtype first so all three see identical inputs.
    inp = dict(inp, **{n: inp[n].to(dtype).float() for n in ("q", "k", "v", "do")})
    exact = _run(cluster_attention_ref, inp, torch.float64, torch.float64)
    same = _run(cluster_attention_ref, inp, dtype, torch.float32)
    kern = _run(kernel_fn, inp, dtype, torch.float32)
    return error_rows(NAMES, exact, same, kern)


PACKED_NAMES = ("out", "dqkv", "d_bias_weight", "d_bias_bias", "d_blank_k", "d_blank_v")


def packed_vs_unpacked(inp, dtype) -> list[str]:
    """The packed entry (one (B, N, 3, H, D) qkv; the backward writes its gradient packed) against
    q, k, v unbound from it (three gradients, stacked into qkv's). The same kernels compute the
    same values and only the addresses of dq, dk, dv change, so the output and every gradient
    must be bitwise equal; so must the packed custom op, its eager launcher and the unpacked
    launcher's three gradients stacked. Returns one message per difference."""
    from affmae.ops.cluster_attention import kernel
    from affmae.ops.cluster_attention.function import (cluster_attention_triton,
                                                       cluster_attention_triton_packed)

    qkv = torch.stack([inp[n] for n in "qkv"], 2).to(dtype)  # (B, N, 3, H, D)
    do = inp["do"].to(dtype)
    rest = (inp["pos"], inp["nbr"], inp["n_valid"])
    label = f"{tuple(qkv.shape)} {dtype}"

    # Autograd: q, k, v as views of one tensor (a fused projection's layout), then packed.
    q, k, v = (t.detach().requires_grad_() for t in qkv.clone().unbind(2))
    params = [p.clone().requires_grad_() for p in inp["params"]]
    out = cluster_attention_triton(q, k, v, *rest, *params)
    out.backward(do)
    unpacked = [out, torch.stack([q.grad, k.grad, v.grad], 2), *(p.grad for p in params)]
    leaf = qkv.clone().requires_grad_()
    params = [p.clone().requires_grad_() for p in inp["params"]]
    out = cluster_attention_triton_packed(leaf, *rest, *params)
    out.backward(do)
    packed = [out, leaf.grad, *(p.grad for p in params)]
    bad = [f"{label} {name}: packed differs from unpacked by {(a.double() - b.double()).abs().max()}"
           for name, a, b in zip(PACKED_NAMES, unpacked, packed) if not torch.equal(a, b)]
    if not leaf.grad.is_contiguous():
        bad.append(f"{label}: dqkv strides {leaf.grad.stride()} are not contiguous")

    # Launchers and custom ops (what torch.compile and FLOP counters see).
    args = (*qkv.unbind(2), *rest, *inp["params"], qkv.shape[-1] ** -0.5)
    o, lse = kernel.attention_forward(*args)
    bwd = (o, lse, *args[3:])
    *grads, g = kernel.attention_backward(do, *args[:3], *bwd)
    stacked = (torch.stack(grads, 2), g)
    for name, got in (("launcher", kernel.attention_backward_packed(do, qkv, *bwd)),
                      ("custom op", torch.ops.affmae.cluster_attention_bwd_packed(do, qkv, *bwd))):
        if not all(torch.equal(a, b) for a, b in zip(stacked, got)):
            bad.append(f"{label}: packed {name} differs from the unpacked launcher, stacked")
    return bad


# ------------------------------------------------------------------------------------------------
# Interpreter cases (CPU, run in one subprocess): name -> (make_inputs kwargs, dtype)
# Each case costs ~0.2 s of interpreter time per (batch, head, cluster). The kernels take
# G = 16 // m clusters per program: m = 8 -> 2, m = 4 -> 4, m = 2 -> 8, m = 16 -> 1, m = 6 -> 2.
# ------------------------------------------------------------------------------------------------

CASES = {
    # N = 217 real tokens, padded to 28 clusters of 8.
    "n217_m8_d16_fp16": (dict(B=1, n_valid=217, m=8, H=1, D=16, Kc=4), "fp16"),
    "n217_m8_d16_bf16": (dict(B=1, n_valid=217, m=8, H=1, D=16, Kc=4), "bf16"),
    "n57_m8_d32_fp32": (dict(B=2, n_valid=57, m=8, H=2, D=32, Kc=3), "fp32"),
    # Global case, Kc > M (clusters repeat): 3 clusters, 10 neighbour slots = 80 keys, 3 key tiles.
    "global_kc10_m3_fp32": (dict(B=2, n_valid=21, m=8, H=2, D=16, Kc=10, repeat_nbr=True), "fp32"),
    "global_kc10_m3_bf16": (dict(B=1, n_valid=21, m=8, H=2, D=16, Kc=10, repeat_nbr=True), "bf16"),
    # Global case as clustering makes it: Kc clipped to M = 3.
    "global_kc3_fp16": (dict(B=2, n_valid=20, m=8, H=2, D=32, Kc=8), "fp16"),
    # Other cluster sizes (so group sizes) and head dims; strided q, k, v from a fused projection.
    "m4_d32_fp16": (dict(B=1, n_valid=30, m=4, H=2, D=32, Kc=3), "fp16"),
    "m16_d64_bf16": (dict(B=2, n_valid=40, m=16, H=1, D=64, Kc=3), "bf16"),
    "m6_d24_fused_fp32": (dict(B=1, n_valid=29, m=6, H=2, D=24, Kc=3, fused_qkv=True), "fp32"),
    # Eight clusters per program (m = 2), repeats: masks of up to 8 bits, unions with repeats.
    "m2_g8_repeats_fp32": (dict(B=1, n_valid=37, m=2, H=2, D=16, Kc=6, repeat_nbr=True), "fp32"),
}


# Packed qkv against unbound q, k, v (bitwise): name -> (make_inputs kwargs, dtype).
PACKED_CASES = {
    # N = 217 real tokens padded to 28 clusters of 8.
    "packed_n217_fp16": (dict(B=1, n_valid=217, m=8, H=1, D=16, Kc=4), "fp16"),
    # Head dim 24 (padded to 32 in the kernels), two heads and images.
    "packed_d24_bf16": (dict(B=2, n_valid=45, m=8, H=2, D=24, Kc=3), "bf16"),
    "packed_d24_fp32": (dict(B=2, n_valid=45, m=8, H=2, D=24, Kc=3), "fp32"),
}


def _group_mismatches() -> list[str]:
    """Group structures from the kernels vs ``group_neighbourhood_ref`` (index-only: exact), for
    both directions, both key-major methods and several group sizes, repeats included."""
    from affmae.ops.cluster_attention.kernel import group_entries, group_neighbourhood, group_neighbourhood_ref

    g = torch.Generator().manual_seed(1)
    bad = []
    # (2, 300, 8): 2400 entries per image, where "auto" sorts; the others count.
    for B, M, Kc, repeats in ((3, 11, 5, True), (2, 40, 8, False), (1, 3, 10, True), (2, 300, 8, False)):
        if repeats:
            nbr = torch.randint(0, M, (B, M, Kc), generator=g)
        else:
            nbr = torch.stack([torch.stack([torch.randperm(M, generator=g)[:Kc] for _ in range(M)])
                               for _ in range(B)])
        for G in (1, 2, 3, 8):
            for t in (False, True):
                got = group_neighbourhood(nbr, G, transpose=t)
                if t:
                    for method in ("count", "sort"):
                        if not torch.equal(got, group_neighbourhood(nbr, G, True, method=method)):
                            bad.append(f"B={B} M={M} Kc={Kc} G={G}: key-major {method!r} differs from 'auto'")
                if group_entries(got, M, Kc, G, t) != group_neighbourhood_ref(nbr, G, t):
                    bad.append(f"B={B} M={M} Kc={Kc} G={G} transpose={t}: entries differ from the spec")
    return bad


def _custom_op_path_difference() -> float:
    """Max difference between the custom ops (what torch.compile and FLOP counters see) and the
    eager fast path: the same kernels, so it must be 0."""
    from affmae.ops.cluster_attention import kernel
    from affmae.ops.cluster_attention import function  # noqa: F401  (registers the ops)

    inp = make_inputs(B=1, n_valid=20, m=8, H=1, D=16, Kc=2)
    args = (inp["q"], inp["k"], inp["v"], inp["pos"], inp["nbr"], inp["n_valid"], *inp["params"], 0.25)
    direct = kernel.attention_forward(*args)
    op = torch.ops.affmae.cluster_attention_fwd(*args)
    bwd_args = (inp["do"], *args[:3], *direct, *args[3:])
    direct += kernel.attention_backward(*bwd_args)
    op += torch.ops.affmae.cluster_attention_bwd(*bwd_args)
    return max((a - b).abs().max().item() for a, b in zip(direct, op))


def _param_grad_sums() -> list[str]:
    """Pass 2 sums pass 1's per-program partial parameter gradients in the kernel: against
    torch's sum of the same partials (``passes="q"`` returns that, with NaN for the bias
    weights' gradient, which only pass 2 computes), for a grid with fewer
    programs than 16-row blocks of partials (each program then sums several) and a larger one.
    Only the order of float32 additions may differ."""
    from affmae.ops.cluster_attention import kernel

    bad = []
    for kw in (dict(B=1, n_valid=9, m=8, H=1, D=48, Kc=2), dict(B=2, n_valid=217, m=8, H=2, D=16, Kc=3)):
        inp = make_inputs(**kw)
        args = (inp["q"], inp["k"], inp["v"], inp["pos"], inp["nbr"], inp["n_valid"], *inp["params"], 0.25)
        o, lse = kernel.attention_forward(*args)
        bwd = (inp["do"], *args[:3], o, lse, *args[3:])
        g = kernel.attention_backward(*bwd)[-1]
        ref = kernel.attention_backward(*bwd, passes="q")[-1]
        H, D = kw["H"], kw["D"]
        if g.shape != (6 * H + 2 * H * D,) or not torch.isfinite(g).all():
            bad.append(f"{kw}: g has shape {tuple(g.shape)} or non-finite values")
        if not ref[:5 * H].isnan().all():  # the bias weights' gradient comes from pass 2
            bad.append(f"{kw}: passes='q' returned a bias-weight gradient it did not compute")
        g, ref = g[5 * H:], ref[5 * H:]  # pass 1's partials, summed by pass 2 and by torch
        if not torch.allclose(g, ref, rtol=1e-5, atol=1e-6):
            bad.append(f"{kw}: in-kernel sums differ from torch's by {(g - ref).abs().max().item():.3e}")
    return bad


def _given_groups() -> dict:
    """Attention with caller-built group structures (what the model shares across a stage's
    blocks) against calls that build their own: through autograd, through the custom op, and
    through the ClusterAttention layer with a cached ``Clustering``. Same kernels, same
    indices: the differences must be exactly 0."""
    from affmae.layers.attention import ClusterAttention
    from affmae.ops.cluster_attention import function  # noqa: F401  (registers the ops)
    from affmae.ops.cluster_attention import kernel
    from affmae.ops.cluster_attention.function import cluster_attention_triton
    from affmae.ops.clustering import balanced_clustering, gather_tokens, pad_tokens

    inp = make_inputs(B=2, n_valid=37, m=8, H=2, D=16, Kc=3)
    grp, grp_t = kernel.attention_groups(inp["nbr"], 8), kernel.attention_groups(inp["nbr"], 8, True)
    diffs = []

    def grads(**kw):
        leaves = [t.detach().clone().requires_grad_() for t in (inp["q"], inp["k"], inp["v"], *inp["params"])]
        q, k, v, *p = leaves
        out = cluster_attention_triton(q, k, v, inp["pos"], inp["nbr"], inp["n_valid"], *p, **kw)
        return [out, *torch.autograd.grad(out, leaves, inp["do"])]

    own = grads()
    for groups in ((grp, grp_t), (grp, None), (None, grp_t)):
        diffs += [(a - b).abs().max().item() for a, b in zip(own, grads(groups=groups))]
    args = (inp["q"], inp["k"], inp["v"], inp["pos"], inp["nbr"], inp["n_valid"], *inp["params"], 0.25)
    o, lse = kernel.attention_forward(*args)
    bwd_args = (inp["do"], *args[:3], o, lse, *args[3:])
    own = torch.ops.affmae.cluster_attention_bwd(*bwd_args)
    given = torch.ops.affmae.cluster_attention_bwd(*bwd_args, grp, grp_t)
    diffs += [(a - b).abs().max().item() for a, b in zip(own, given)]
    errors = []
    # M = 4 clusters, G = 2: both structures hold M * Kc entries; only their widths' parity
    # tells them apart, so the two swapped must still be refused.
    even = make_inputs(B=1, n_valid=32, m=8, H=1, D=16, Kc=3)
    even_args = (even["do"], even["q"], even["k"], even["v"], even["do"], lse.new_zeros(1, 1, 32), even["pos"],
                 even["nbr"], even["n_valid"], *even["params"], 0.25)
    swapped = dict(grp=kernel.attention_groups(even["nbr"], 8, True), grp_t=kernel.attention_groups(even["nbr"], 8))
    for a, kw in ((bwd_args, dict(grp_t=grp_t[:, 1:])), (bwd_args, dict(grp=grp_t)),
                  (bwd_args, dict(grp=grp, group=1)), (even_args, swapped)):
        try:
            kernel.attention_backward(*a, **kw)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))

    # The layer: the first grad-enabled call caches the clustering's two structures, the second
    # reuses them, and both equal a layer call on a fresh clustering; a call without gradients
    # builds only the forward one.
    torch.manual_seed(0)
    layer = ClusterAttention(32, 2, backend="triton")
    side = 8
    cells = torch.randperm(side * side)[:45]
    pos = torch.stack([cells % side, cells // side], -1).float()[None]  # (1, 45, 2)
    cl = balanced_clustering(pos, (side, side), m=8, num_nbr_clusters=3)
    x = torch.randn(1, cl.n_padded, 32)
    pos_c = pad_tokens(gather_tokens(pos, cl.perm), cl.n_padded)
    cached_before = sorted(cl.groups)
    layer(x, pos_c, cl).sum().backward()
    cached = sorted(cl.groups)
    first = dict(cl.groups)
    g1 = layer.qkv.weight.grad.clone()
    layer.zero_grad()
    layer(x, pos_c, cl).sum().backward()
    reused = all(cl.groups[t] is first[t] for t in first)
    g2 = layer.qkv.weight.grad.clone()
    layer.zero_grad()
    fresh = balanced_clustering(pos, (side, side), m=8, num_nbr_clusters=3)
    with torch.no_grad():
        layer(x, pos_c, fresh)
    no_grad_builds = sorted(fresh.groups)
    layer(x, pos_c, fresh).sum().backward()
    diffs += [(g1 - g2).abs().max().item(), (g1 - layer.qkv.weight.grad).abs().max().item()]
    return dict(diff=max(diffs), errors=errors, cached_before=cached_before, cached=cached,
                reused=reused, no_grad_builds=no_grad_builds)


def _packed_layer() -> dict:
    """ClusterAttention on the Triton backend (packed qkv) against the layer's forward as it was
    before packing (q, k, v unbound from the projection, then ``cluster_attention``): output
    and every gradient bitwise equal, and the packed backward neither has an unbind / stack
    autograd node nor dispatches aten.stack / aten.cat (the unpacked one does, the control)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from affmae.layers.attention import ClusterAttention

    torch.manual_seed(0)
    C, H = 48, 2
    layer = ClusterAttention(C, H, backend="triton")
    with torch.no_grad():  # non-zero bias and blank weights, so every gradient path is exercised
        for p in (layer.rel_bias.weight, layer.rel_bias.bias, layer.blank_k, layer.blank_v):
            p.normal_()
    side = 8
    cells = torch.stack([torch.randperm(side * side)[:37] for _ in range(2)])
    pos = torch.stack([cells % side, cells // side], -1).float()  # (2, 37, 2)
    cl = balanced_clustering(pos, (side, side), m=8, num_nbr_clusters=3)
    B, N = 2, cl.n_padded  # 37 tokens padded to 40
    pos_c = pad_tokens(gather_tokens(pos, cl.perm), N)

    def unpacked(x):
        q, k, v = layer.qkv(x).view(B, N, 3, H, C // H).unbind(2)
        out = cluster_attention(q, k, v, pos_c, cl.nbr, cl.n_valid, layer.rel_bias.weight,
                                layer.rel_bias.bias, layer.blank_k, layer.blank_v, backend="triton",
                                groups=cl.attention_groups(True))
        return layer.proj(out.reshape(B, N, C))

    class StackCount(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.stacks, self.ops = 0, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            self.ops.add(name)
            self.stacks += name in ("aten.stack", "aten.cat")
            return func(*args, **(kwargs or {}))

    x0 = torch.randn(B, N, C)
    gy = torch.randn(B, N, C)
    found = {}
    for name, fn in (("unpacked", unpacked), ("packed", lambda x: layer(x, pos_c, cl))):
        x = x0.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        y = fn(x)
        nodes, todo = set(), [y.grad_fn]
        while todo:  # every autograd node of the backward graph
            node = todo.pop()
            if node is not None and node not in nodes:
                nodes.add(node)
                todo.extend(f for f, _ in node.next_functions)
        with StackCount() as count:  # a dispatch mode: the backward goes through the custom op
            y.backward(gy)
        found[name] = dict(values=[y.detach(), x.grad] + [p.grad for p in layer.parameters()],
                           nodes=sorted({type(n).__name__ for n in nodes}), stacks=count.stacks,
                           ops=sorted(count.ops))
    same = all(torch.equal(a, b) for a, b in zip(found["unpacked"]["values"], found["packed"]["values"]))
    return dict(same=same, **{f"{k}_{name}": v[k] for name, v in found.items()
                              for k in ("nodes", "stacks", "ops")})


def _packed_compiled() -> list[str]:
    """The packed entry traced by torch.compile (fullgraph, aot_eager: the custom ops' fake
    implementations and the autograd Function with k = v = None) against eager: bitwise."""
    inp = make_inputs(B=1, n_valid=20, m=8, H=2, D=16, Kc=2)
    qkv = torch.stack([inp[n] for n in "qkv"], 2)  # (B, N, 3, H, D)

    def loss(qkv, *params):
        out = cluster_attention_packed(qkv, inp["pos"], inp["nbr"], inp["n_valid"], *params,
                                       backend="triton")
        return (out * inp["do"]).sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        leaves = [qkv.clone().requires_grad_()] + [p.clone().requires_grad_() for p in inp["params"]]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach()] + [t.grad for t in leaves])
    names = ("loss",) + PACKED_NAMES[1:]
    return [f"compiled {name} differs from eager" for name, e, c in zip(names, *results)
            if not torch.equal(e, c)]


def _worker(path: str) -> None:
    """Run every interpreter case (TRITON_INTERPRET=1 is set by the caller) and write JSON."""
    from affmae.ops.cluster_attention.function import cluster_attention_triton

    def case(kw, dtype):
        return lambda: three_way(make_inputs(**kw), DTYPES[dtype], cluster_attention_triton)

    def packed(kw, dtype):
        return lambda: packed_vs_unpacked(make_inputs(**kw), DTYPES[dtype])

    jobs = {name: case(*spec) for name, spec in CASES.items()}
    jobs.update({name: packed(*spec) for name, spec in PACKED_CASES.items()})
    write_results(path, {**jobs, "groups": _group_mismatches, "custom_op": _custom_op_path_difference,
                         "given_groups": _given_groups, "packed_layer": _packed_layer,
                         "param_grad_sums": _param_grad_sums,
                         "packed_compiled": _packed_compiled})


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_interpreter(__file__, tmp_path_factory.mktemp("interp"), timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_matches_reference(interpreter_results, case):
    rows = result(interpreter_results, case)
    assert set(rows) == set(NAMES), f"{case}: missing outputs {set(NAMES) - set(rows)}"
    assert_three_way(rows, case)


def test_interpreter_group_structures_are_exact(interpreter_results):
    bad = result(interpreter_results, "groups")
    assert bad == [], "group structures differ:\n" + "\n".join(bad[:10])


def test_interpreter_given_group_structures_are_the_same_function(interpreter_results):
    r = result(interpreter_results, "given_groups")
    assert r["diff"] == 0.0, f"outputs or gradients with given group structures differ by {r['diff']}"
    wrong_width, wrong_kind, wrong_group, swapped = r["errors"]
    assert "grp must be" in swapped, swapped
    assert "grp_t must be" in wrong_width, wrong_width
    assert "grp must be" in wrong_kind, wrong_kind  # a key-major structure passed as the forward one
    assert "grp must be" in wrong_group and "G=1" in wrong_group, wrong_group
    assert r["cached_before"] == [] and r["cached"] == [False, True], r
    assert r["reused"], "the second block of a stage rebuilt the group structures"
    assert r["no_grad_builds"] == [False], "a forward without gradients built the key-major structure"


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_interpreter_packed_qkv_is_bitwise_unpacked(interpreter_results, case):
    bad = result(interpreter_results, case)
    assert bad == [], "\n".join(bad)


def test_interpreter_packed_layer_has_no_stack(interpreter_results):
    r = result(interpreter_results, "packed_layer")
    assert r["same"], "the packed layer's output or gradients differ from the unpacked forward's"
    # The control: unbinding q, k, v makes autograd stack their gradients.
    assert "UnbindBackward0" in r["nodes_unpacked"] and r["stacks_unpacked"] > 0, r
    assert "ClusterAttentionFunctionBackward" in r["nodes_packed"], r["nodes_packed"]
    assert not {"UnbindBackward0", "StackBackward0"} & set(r["nodes_packed"]), r["nodes_packed"]
    assert r["stacks_packed"] == 0, f"the packed backward stacks or concatenates: {r['ops_packed']}"
    assert "affmae.cluster_attention_bwd_packed" in r["ops_packed"], r["ops_packed"]


def test_interpreter_packed_compiles(interpreter_results):
    bad = result(interpreter_results, "packed_compiled")
    assert bad == [], "\n".join(bad)


def test_interpreter_param_grad_sums_in_kernel(interpreter_results):
    bad = result(interpreter_results, "param_grad_sums")
    assert bad == [], "\n".join(bad)


def test_interpreter_custom_ops_match_eager_path(interpreter_results):
    diff = result(interpreter_results, "custom_op")
    assert diff == 0.0, f"custom ops differ from the eager launchers by {diff}"


# ------------------------------------------------------------------------------------------------
# In-process CPU tests (no kernel launch)
# ------------------------------------------------------------------------------------------------


def test_group_structure_spec_and_argument_checks():
    """The specification of the group structures on a hand-worked example, and the builder's
    argument checks (raised before any launch, so they run without Triton's interpreter)."""
    from affmae.ops.cluster_attention.kernel import group_neighbourhood, group_neighbourhood_ref

    nbr = torch.tensor([[[0, 1, 1], [1, 0, 2], [2, 1, 0]]])  # (1, M=3, Kc=3), a repeat in row 0
    # Groups of 2 query clusters: {0, 1} and {2}. Row 0 lists 1 twice: (1, first) and (1, second)
    # are two entries; row 1 lists 1 once, so only the first carries its bit (2).
    assert group_neighbourhood_ref(nbr, 2) == [[[(0, 3), (1, 1), (1, 3), (2, 2)], [(0, 1), (1, 1), (2, 1)]]]
    # Key-major, groups of 2 key clusters: {0, 1} lists query 0 (bits 0 and 1, then 1 again for
    # the repeat), 1 (bits 0, 1) and 2 (bits 0, 1); {2} lists queries 1 and 2.
    assert group_neighbourhood_ref(nbr, 2, transpose=True) == [[[(0, 2), (0, 3), (1, 3), (2, 3)],
                                                                [(1, 1), (2, 1)]]]
    with pytest.raises(ValueError, match="group size G=0"):
        group_neighbourhood(nbr, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        group_neighbourhood(nbr, 2, transpose=True, method="bucket")


def test_launch_settings_per_kernel(monkeypatch):
    """kernel.NUM_STAGES and kernel.MAXNREG reach each kernel's launch settings (the register
    cap only off the interpreter, where Triton would reject it)."""
    from affmae.ops.cluster_attention import kernel

    monkeypatch.setitem(kernel.NUM_STAGES, "q", 3)
    monkeypatch.setitem(kernel.MAXNREG, "kv", 128)
    monkeypatch.setattr(kernel, "interpreting", lambda: False)
    fwd, q, kv = (kernel._tiles(8, 32, torch.bfloat16, 2, kernel=k) for k in ("fwd", "q", "kv"))
    assert (fwd["num_stages"], q["num_stages"], kv["num_stages"]) == (2, 3, 2)
    assert kv["maxnreg"] == 128 and "maxnreg" not in fwd
    monkeypatch.setattr(kernel, "interpreting", lambda: True)
    assert "maxnreg" not in kernel._tiles(8, 32, torch.bfloat16, 2, kernel="kv")


def test_why_not_names_the_reason(monkeypatch):
    from affmae.ops.cluster_attention import kernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel.why_not(torch.zeros(1, 8, 1, 32)) is None, "fp32, D=32 should be supported"
    assert "float64" in kernel.why_not(torch.zeros(1, 8, 1, 32, dtype=torch.float64))
    assert "D=8" in kernel.why_not(torch.zeros(1, 8, 1, 8))
    assert "D=256" in kernel.why_not(torch.zeros(1, 8, 1, 256))


def test_backend_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("AFFMAE_ATTENTION_BACKEND", raising=False)
    inp = make_inputs(B=1, n_valid=16, m=8, H=1, D=16, Kc=2)
    args = (inp["q"], inp["k"], inp["v"], inp["pos"], inp["nbr"], inp["n_valid"], *inp["params"])
    reason = why_not_triton(inp["q"])
    assert reason is not None and "cpu" in reason, f"CPU without interpreter should be refused: {reason}"
    with pytest.raises(RuntimeError, match="not CUDA"):
        cluster_attention(*args, backend="triton")
    torch.testing.assert_close(cluster_attention(*args, backend="auto"), cluster_attention_ref(*args))


def test_fake_shapes_and_flop_formula():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    import affmae.ops.cluster_attention.function  # noqa: F401  (registers the ops)

    B, M, m, H, D, Kc = 2, 5, 8, 3, 32, 4
    N = M * m
    with FakeTensorMode():
        q = torch.empty(B, N, H, D, dtype=torch.bfloat16)
        pos = torch.empty(B, N, 2)
        nbr = torch.empty(B, M, Kc, dtype=torch.int64)
        w, wb, bk, bv = torch.empty(H, 5), torch.empty(H), torch.empty(H, D), torch.empty(H, D)
        with FlopCounterMode(display=False) as fc:
            out, lse = torch.ops.affmae.cluster_attention_fwd(q, q, q, pos, nbr, N - 3, w, wb, bk, bv, 0.2)
            grads = torch.ops.affmae.cluster_attention_bwd(
                out, q, q, q, out, lse, pos, nbr, N - 3, w, wb, bk, bv, 0.2
            )
            qkv = torch.empty(B, N, 3, H, D, dtype=torch.bfloat16)
            dqkv, g = torch.ops.affmae.cluster_attention_bwd_packed(
                out, qkv, out, lse, pos, nbr, N - 3, w, wb, bk, bv, 0.2
            )
    assert out.shape == (B, N, H, D) and out.dtype == torch.bfloat16, f"out {out.shape} {out.dtype}"
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32, f"lse {lse.shape} {lse.dtype}"
    want_shapes = [(B, N, H, D)] * 3 + [(6 * H + 2 * H * D,)]
    assert [tuple(g.shape) for g in grads] == want_shapes, f"grad shapes {[g.shape for g in grads]}"
    # The packed backward's dqkv is contiguous (B, N, 3, H, D), as the launcher allocates it.
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous() and dqkv.dtype == torch.bfloat16, (
        f"dqkv {dqkv.shape} {dqkv.stride()} {dqkv.dtype}")
    assert g.shape == (6 * H + 2 * H * D,) and g.dtype == torch.float32, f"g {g.shape} {g.dtype}"
    fwd = 4 * B * N * H * (Kc * m + 1) * D
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    want = {"affmae.cluster_attention_fwd": fwd, "affmae.cluster_attention_bwd": 5 * fwd // 2,
            "affmae.cluster_attention_bwd_packed": 5 * fwd // 2}
    assert counts == want, f"FLOP counts {counts}, expected {want}"


def test_packed_reference_is_unbound_reference():
    """The torch backend of ``cluster_attention_packed`` is the reference of qkv.unbind(2):
    same output and qkv gradient, bitwise. A tensor that is not (B, N, 3, H, D) is refused."""
    inp = make_inputs(B=2, n_valid=21, m=8, H=2, D=16, Kc=2)
    qkv = torch.stack([inp[n] for n in "qkv"], 2)  # (B, N, 3, H, D)
    rest = (inp["pos"], inp["nbr"], inp["n_valid"], *inp["params"])
    values = []
    for fn in (lambda t: cluster_attention(*t.unbind(2), *rest, backend="torch"),
               lambda t: cluster_attention_packed(t, *rest, backend="torch")):
        leaf = qkv.clone().requires_grad_()
        out = fn(leaf)
        out.backward(inp["do"])
        values.append((out.detach(), leaf.grad))
    assert all(torch.equal(a, b) for a, b in zip(*values)), "packed reference differs from unbound"
    with pytest.raises(ValueError, match=r"qkv must be \(B, N, 3, H, D\)"):
        cluster_attention_packed(inp["q"], *rest, backend="torch")


# ------------------------------------------------------------------------------------------------
# GPU tests (full size)
# ------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# aff_small stages at 512 px, mask ratio 0.5, d_s 0.4: (tokens, heads); head dim 32, m 8, Kc 8.
STAGES_512 = [(2048, 3), (819, 6), (327, 12), (130, 16)]


def stage_inputs(stage: int) -> dict:
    """Full-size CUDA inputs of one aff_small stage at 512 px, batch 16."""
    n, H = STAGES_512[stage]
    return make_inputs(B=16, n_valid=n, m=8, H=H, D=32, Kc=8, seed=stage, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", range(4))
def test_gpu_full_size_matches_reference(dtype, stage):
    from affmae.ops.cluster_attention.function import cluster_attention_triton

    rows = three_way(stage_inputs(stage), DTYPES[dtype], cluster_attention_triton)
    assert_three_way(rows, f"stage {stage + 1} {dtype}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_large_logits_stay_finite(dtype):
    from affmae.ops.cluster_attention.function import cluster_attention_triton

    # q, k scaled by 30: logits of order 30 * 30 * sqrt(D) * scale ~ 5000, softmax rows one-hot.
    # The kernel accumulates in float32 and must stay finite and as accurate as the reference.
    # Where a gradient vanishes (one-hot rows make the bias-weight gradient exactly 0 in the
    # reference), the float32 log-sum-exp at |logit| ~ 7000 has ~5e-4 resolution, so the kernel
    # may differ by LARGE_LOGIT_FLOOR in absolute terms (those gradients are O(1) otherwise).
    LARGE_LOGIT_FLOOR = 1e-3
    inp = make_inputs(B=4, n_valid=819, m=8, H=6, D=32, Kc=8, device="cuda", logit_gain=30.0)
    rows = three_way(inp, DTYPES[dtype], cluster_attention_triton)
    for name, (err_k, err_ref, scale, finite) in rows.items():
        assert finite, f"{dtype} {name}: NaN/Inf with large logits"
        ref_ok = err_ref == err_ref and err_ref != float("inf")  # the half-precision reference may overflow
        bound = (FACTOR * err_ref if ref_ok else 2.0**-6 * scale) + FLOOR * scale + LARGE_LOGIT_FLOOR
        assert err_k <= bound, f"{dtype} {name}: error {err_k:.3e} > {bound:.3e} (scale {scale:.3e})"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_torch_compile_fullgraph(packed):
    inp = make_inputs(B=2, n_valid=300, m=8, H=6, D=32, Kc=8, device="cuda")

    do = inp["do"]

    def loss(q, k, v, pos, nbr, n_valid, w, wb, bk, bv):
        if packed:  # the packed custom backward op
            qkv = torch.stack([q, k, v], 2)
            out = cluster_attention_packed(qkv, pos, nbr, n_valid, w, wb, bk, bv, backend="triton")
        else:
            out = cluster_attention(q, k, v, pos, nbr, n_valid, w, wb, bk, bv, backend="triton")
        return (out.float() * do).sum()

    compiled = torch.compile(loss, fullgraph=True)
    args = [inp[n].to(torch.bfloat16) for n in "qkv"] + [inp["pos"], inp["nbr"], inp["n_valid"]]
    results = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_() for t in args[:3]] + [
            p.clone().requires_grad_() for p in inp["params"]
        ]
        value = fn(*leaves[:3], *args[3:], *leaves[3:])
        value.backward()
        results.append([value.detach()] + [t.grad for t in leaves])
    for name, e, c in zip(("loss",) + NAMES[1:], *results):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-3, msg=lambda s, n=name: f"compiled {n}: {s}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", range(4))
def test_gpu_packed_qkv_is_bitwise_unpacked(dtype, stage):
    bad = packed_vs_unpacked(stage_inputs(stage), DTYPES[dtype])
    assert bad == [], "\n".join(bad)


@pytest.mark.gpu
@gpu
def test_gpu_auto_backend_uses_triton(monkeypatch):
    monkeypatch.delenv("AFFMAE_ATTENTION_BACKEND", raising=False)
    from affmae.ops.cluster_attention import resolve_backend

    q = torch.zeros(1, 8, 1, 32, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q) == "triton", f"auto chose torch: {why_not_triton(q)}"
    with pytest.warns(UserWarning, match="float64"):
        assert resolve_backend("auto", q.double()) == "torch"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast"])
def test_gpu_aff_small_training_step_matches_reference_backend(precision):
    from affmae import create_model

    # One checkpoint, both backends: same weights, batch, mask and randomness. drop_path = 0 so
    # both steps take identical stochastic choices. In bf16 the stages' top-k token selection can
    # flip near-ties between backends, so that comparison is looser.
    B, res = 4, 512
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(B, 1, res, res, generator=g).cuda()
    n = (res // 8) ** 2
    is_masked = torch.zeros(B, n, dtype=torch.bool)
    is_masked.scatter_(1, torch.rand(B, n, generator=g).argsort(1)[:, : n // 2], True)
    is_masked = is_masked.cuda()
    ref = create_model("aff_small", drop_path=0.0, attention_backend="torch").cuda().train()
    tri = create_model("aff_small", drop_path=0.0, attention_backend="triton").cuda().train()
    tri.load_state_dict(ref.state_dict())
    results = []
    for model in (ref, tri):
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision != "fp32"):
            loss = model(imgs, is_masked)["loss"]
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach().float(), grads))
    (l_ref, g_ref), (l_tri, g_tri) = results
    assert torch.isfinite(l_tri) and torch.isfinite(g_tri).all(), "triton step produced NaN/Inf"
    assert g_ref.shape == g_tri.shape, f"different parameters got gradients: {g_ref.shape} vs {g_tri.shape}"
    loss_tol, grad_tol = (1e-4, 1e-3) if precision == "fp32" else (2e-2, 5e-2)
    rel_loss = ((l_tri - l_ref).abs() / l_ref.abs()).item()
    rel_grad = ((g_tri - g_ref).norm() / g_ref.norm()).item()
    assert rel_loss <= loss_tol, f"{precision}: loss {l_tri.item():.6f} vs reference {l_ref.item():.6f}"
    assert rel_grad <= grad_tol, f"{precision}: gradient relative difference {rel_grad:.3e} > {grad_tol}"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
