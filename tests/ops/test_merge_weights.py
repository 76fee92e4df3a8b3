"""Token merging's neighbour weights: the Triton kernels (``affmae.ops._merge_weights_kernel``,
through ``TokenMerging.neighbour_weights``) against the modules they replace, by the three-way
rule (tests/ops/kernel_checks.py): against a float64 run of the modules, the kernel's error is at
most 3x the modules' error, plus a small floor, in float32 and under bfloat16 autocast (where
the modules' Linear runs in bfloat16 and the kernels stay float32). CPU: Triton's interpreter in
a subprocess; GPU: full size."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_checks import interpret

_CASES = textwrap.dedent("""
    import copy
    import os
    import torch
    from kernel_checks import error_rows, three_way_failures
    from affmae.layers.merge import TokenMerging

    NAMES = ("w", "d_imp", "lin.weight", "lin.bias", "norm.weight", "norm.bias")

    def cases(device, full=False):
        g = torch.Generator().manual_seed(0)
        shapes = [(16, 2048, 819, 64)] if full else [(2, 40, 9, 16), (1, 24, 5, 24), (3, 17, 1, 8)]
        for B, Np, k, K in shapes:
            mod = TokenMerging(8, 8, 0.5)
            for p in mod.weight_net.parameters():
                torch.nn.init.normal_(p, std=0.7, generator=g)
            pos = torch.rand(B, Np, 2, generator=g, dtype=torch.float64) * 30
            pos[:, :2] = torch.randint(0, 30, (B, 2, 2), generator=g).double()  # on-grid
            slots = torch.randint(0, Np, (B, k, K), generator=g)
            kept = slots[:, :, 0]  # a kept token is among its own neighbours: r = 0
            pos_k = torch.gather(pos, 1, kept[..., None].expand(-1, -1, 2))
            imp = torch.rand(B, k, K, generator=g, dtype=torch.float64)
            gw = torch.randn(B, k, K, 4, generator=g, dtype=torch.float64)
            yield mod.to(device), [t.to(device) for t in (pos, pos_k, slots, imp, gw)]

    def run(mod, pos, pos_k, slots, imp, gw, dtype, backend, autocast=False):
        mod = copy.deepcopy(mod).to(dtype)
        imp = imp.to(dtype).requires_grad_()
        params = [mod.weight_net[0].weight, mod.weight_net[0].bias, mod.weight_net[1].weight,
                  mod.weight_net[1].bias]
        before = os.environ.get("AFFMAE_KERNELS")
        os.environ["AFFMAE_KERNELS"] = backend  # "torch": the modules; "auto": the kernels
        try:
            with torch.autocast(pos.device.type, dtype=torch.bfloat16, enabled=autocast):
                w = mod.neighbour_weights(pos.to(dtype), pos_k.to(dtype), slots, imp)
            grads = torch.autograd.grad(w, [imp] + params, gw.to(dtype))
        finally:
            if before is None:
                del os.environ["AFFMAE_KERNELS"]
            else:
                os.environ["AFFMAE_KERNELS"] = before
        assert w.dtype == dtype, w.dtype
        return [w.detach()] + list(grads)

    def errors(device, full=False):
        bad = []
        for mod, args in cases(device, full):
            exact = run(mod, *args, torch.float64, "torch")
            for autocast in (False, True):
                same = run(mod, *args, torch.float32, "torch", autocast)
                kern = run(mod, *args, torch.float32, "auto", autocast)
                rows = error_rows(NAMES, exact, same, kern)
                bad += three_way_failures(rows, f"{tuple(args[2].shape)} autocast={autocast}")
        return bad

    def uses_kernel(device):
        from affmae.layers import merge
        mod, args = next(cases(device))
        calls = []
        orig = merge._MergeWeights.apply
        merge._MergeWeights.apply = lambda *a: calls.append(1) or orig(*a)
        try:
            run(mod, *args, torch.float32, "auto")
        finally:
            merge._MergeWeights.apply = orig
        return bool(calls)
""")


def test_interpreter_kernels_match_the_modules():
    out = interpret(_CASES + "\nprint(uses_kernel('cpu'))\nprint(errors('cpu') or 'ok')\n")
    assert out == "True\nok", out[-3000:]


def test_cpu_without_interpreter_uses_the_modules(monkeypatch):
    from affmae.layers import merge

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pos = torch.zeros(1, 4, 2)
    params = [torch.zeros(4, 5), torch.zeros(4), torch.ones(4), torch.zeros(4)]
    assert not merge._weights_kernel_ok(pos, torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), *params)


def test_fake_shapes_and_flop_formula():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from affmae.ops import _merge_weights_kernel  # noqa: F401 (registers the ops)

    B, Np, k, K = 2, 30, 7, 16
    with FakeTensorMode():
        pos, pos_k = torch.empty(B, Np, 2), torch.empty(B, k, 2)
        slots, imp = torch.empty(B, k, K, dtype=torch.int64), torch.empty(B, k, K)
        params = (torch.empty(4, 5), torch.empty(4), torch.empty(4), torch.empty(4))
        with FlopCounterMode(display=False) as fc:
            w = torch.ops.affmae.merge_weights_fwd(pos, pos_k, slots, imp, *params, 1e-5)
            d_imp, part = torch.ops.affmae.merge_weights_bwd(w, pos, pos_k, slots, imp, *params,
                                                              1e-5)
    assert w.shape == (B, k, K, 4) and d_imp.shape == (B, k, K) and part.shape == (32,)
    counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
    entries = B * k * K  # the Linear(5 -> 4): 2 * 5 * 4 per entry, forward and weight gradient
    assert counts == {"affmae.merge_weights_fwd": 40 * entries,
                      "affmae.merge_weights_bwd": 40 * entries}, counts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_match_the_modules():
    scope: dict = {}
    exec(_CASES, scope)
    assert scope["uses_kernel"]("cuda")
    assert scope["errors"]("cuda") == []
    assert scope["errors"]("cuda", full=True) == []  # the first merge at 512 px, batch 16
