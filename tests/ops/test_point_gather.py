"""Triton weighted point gather vs the PyTorch reference (decoder interpolation; STYLE.md tests).

Three-way rule (flash-attention's tests): for the output, d_table and d_weights, the kernel's
error against a float64 evaluation of the reference (same rounded inputs) must be within
``FACTOR`` times the error of the reference run at the kernel's precision, plus a tiny floor
relative to the value.

CPU: the kernels run through Triton's interpreter. TRITON_INTERPRET=1 must be set before triton is
first imported, so all interpreter cases run in one subprocess (``python this_file.py --worker
out.json``) and the tests here check its results (as tests/ops/test_cluster_attention_triton.py
does). The interpreter's float32 -> bfloat16 casts truncate instead of rounding, hence ``FACTOR`` 3.
GPU (``@pytest.mark.gpu``): the decoder's full size at 512 px in bf16 / fp16, torch.compile
(fullgraph) and the "auto" backend choice.
"""

from __future__ import annotations

import sys

import pytest
import torch
from kernel_checks import (DTYPES, assert_three_way, error_rows, result, run_interpreter,
                           write_results)

from affmae.ops.point_gather import gather_weighted, resolve_backend, why_not_triton
from affmae.ops.point_gather.reference import gather_weighted_ref

NAMES = ("out", "d_table", "d_weights")


# ------------------------------------------------------------------------------------------------
# Inputs and the three-way comparison (shared by the interpreter worker and the GPU tests)
# ------------------------------------------------------------------------------------------------


def make_inputs(B, Nq, Nk, H, Pt, K, F, seed=0, device="cpu", duplicates=False, strided=False,
                sel_dtype=torch.int64, shared=False, runs=0):
    """float32 table, int slots and softmax weights (as the decoder makes them), and a dO.

    duplicates: slot 1 of every row repeats slot 0 (besides the random repeats of a small Nk).
    strided: the table is a view of a wider (B, Nk, H, 2F) tensor (non-contiguous head stride).
    shared: sel is (B, Nq, H, 1, K), one slot list for the Pt weight sets (token merging).
    runs: runs of this many consecutive queries have the same slot lists, and every head the
        same slots (merging's kept tokens of one cluster; the heads must still add apart).
    """
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(B, Nk, H, 2 * F if strided else F, generator=g)[..., :F]
    sel = torch.randint(0, Nk, (B, Nq, H, 1 if shared else Pt, K), generator=g)
    if duplicates:
        sel[..., 1] = sel[..., 0]
    if runs:
        q = torch.arange(Nq) // runs * runs
        sel = sel[:, q][:, :, :1].expand_as(sel).contiguous()
    weights = torch.softmax(2 * torch.randn(B, Nq, H, Pt, K, generator=g), dim=-1)
    do = torch.randn(B, Nq, H, Pt, F, generator=g)
    return dict(table=table.to(device), sel=sel.to(device, sel_dtype), weights=weights.to(device),
                do=do.to(device))


def _run(fn, inp, dtype, w_dtype):
    """Output and the two gradients of fn with the table (and dO) at ``dtype``."""
    # Fresh leaves every call; ``.to(copy=True)`` keeps the strides of a strided table view.
    table = inp["table"].to(dtype, copy=True)
    if not inp["table"].is_contiguous():  # rebuild the same strided layout at this dtype
        wide = torch.zeros(*table.shape[:-1], 2 * table.shape[-1], dtype=dtype, device=table.device)
        wide[..., : table.shape[-1]] = table
        table = wide[..., : table.shape[-1]]
    table.requires_grad_()
    weights = inp["weights"].to(w_dtype, copy=True).requires_grad_()
    out = fn(table, inp["sel"], weights)
    out.backward(inp["do"].to(out.dtype))
    return [out.detach(), table.grad, weights.grad]


def three_way(inp, dtype, kernel_fn):
    """Per output/gradient: (kernel error, same-precision reference error, max |float64|, finite)."""
    # Round table and dO to dtype first so all three see identical inputs.
    inp = dict(inp, table=inp["table"].to(dtype).float(), do=inp["do"].to(dtype).float())
    exact = _run(gather_weighted_ref, inp, torch.float64, torch.float64)
    same = _run(gather_weighted_ref, inp, dtype, torch.float32)
    kern = _run(kernel_fn, inp, dtype, torch.float32)
    return error_rows(NAMES, exact, same, kern)


# ------------------------------------------------------------------------------------------------
# Interpreter cases (CPU, run in one subprocess): name -> (make_inputs kwargs, dtype, dtable)
# ------------------------------------------------------------------------------------------------

SMALL = dict(B=2, Nq=37, Nk=13, H=3, Pt=4)
CASES = {
    "f24_k3_fp32": (dict(SMALL, K=3, F=24), "fp32", "sorted"),
    "f24_k3_fp16": (dict(SMALL, K=3, F=24), "fp16", "sorted"),
    "f64_k4_bf16": (dict(SMALL, K=4, F=64), "bf16", "sorted"),
    "f64_k4_fp16_duplicates": (dict(SMALL, K=4, F=64, duplicates=True), "fp16", "sorted"),
    "f64_k4_fp32_duplicates_int32": (dict(SMALL, K=4, F=64, duplicates=True, sel_dtype=torch.int32), "fp32", "sorted"),
    "f32_k4_bf16_strided_table": (dict(SMALL, K=4, F=32, strided=True), "bf16", "sorted"),
    # Extremes of the supported range: F = 128, K = 16 (Nk = 5: every row repeats slots), F = 16.
    "f128_k2_bf16": (dict(B=1, Nq=9, Nk=7, H=2, Pt=3, K=2, F=128), "bf16", "sorted"),
    "f16_k16_fp32": (dict(B=1, Nq=11, Nk=5, H=1, Pt=2, K=16, F=16), "fp32", "sorted"),
    # d_table by float32 atomics.
    "atomic_f24_k3_fp32": (dict(SMALL, K=3, F=24), "fp32", "atomic"),
    "atomic_f64_k4_bf16_duplicates": (dict(SMALL, K=4, F=64, duplicates=True), "bf16", "atomic"),
    # The decoder's folded rows: 16 slots over 5 table rows, so most slots repeat in a row.
    "atomic_f16_k16_fp32_repeats": (dict(B=1, Nq=11, Nk=5, H=2, Pt=1, K=16, F=16), "fp32", "atomic"),
    # Token merging's shape: K = Kc * m = 64 slots, F = 96 channels, Pt = 4 weight sets.
    "atomic_f96_k64_bf16_merge": (dict(B=1, Nq=5, Nk=20, H=1, Pt=4, K=64, F=96), "bf16", "atomic"),
    # Shared slots (merging's form since session 6: sel (.., 1, K), J weight sets per row).
    "shared_atomic_f96_k64_bf16_merge": (dict(B=2, Nq=5, Nk=20, H=2, Pt=4, K=64, F=96,
                                              shared=True), "bf16", "atomic"),
    "shared_atomic_f24_k3_fp32_j3": (dict(SMALL, Pt=3, K=3, F=24, shared=True), "fp32", "atomic"),
    # merging's kept tokens: runs of 3 queries with one slot list, the same slots in each head
    "shared_atomic_f96_k64_fp32_runs": (dict(B=1, Nq=13, Nk=90, H=2, Pt=4, K=64, F=96,
                                             shared=True, runs=3), "fp32", "atomic"),
    "shared_sorted_f32_k4_fp16_duplicates": (dict(SMALL, K=4, F=32, shared=True, duplicates=True),
                                             "fp16", "sorted"),
    # d_table summed over a window of table rows per program (one matmul) before the atomics:
    # all slots in the window (Nk = 13), most past it (Nk = 300: the direct-atomic path), the
    # decoder's folded rows (16 slots over 5 rows), Pt = 3 (programs split a query's points),
    # and shared slots (which take the atomic shared kernel).
    "window_f24_k3_fp32": (dict(SMALL, K=3, F=24), "fp32", "window"),
    "window_f64_k4_bf16_wide_table": (dict(B=2, Nq=40, Nk=300, H=2, Pt=2, K=4, F=64), "bf16",
                                      "window"),
    "window_f16_k16_fp32_repeats": (dict(B=1, Nq=11, Nk=5, H=2, Pt=1, K=16, F=16), "fp32",
                                    "window"),
    "window_f32_k4_fp16_pt3_duplicates": (dict(SMALL, Pt=3, K=4, F=32, duplicates=True), "fp16",
                                          "window"),
    "window_shared_f24_k3_fp32": (dict(SMALL, Pt=3, K=3, F=24, shared=True), "fp32", "window"),
}


def _single_gradient_errors() -> dict:
    """Only one input needs a gradient: the other comes back None, the asked one is right."""
    from affmae.ops.point_gather.function import gather_weighted_triton

    inp = make_inputs(B=1, Nq=10, Nk=6, H=2, Pt=2, K=4, F=16, seed=3)
    out = {}
    for which in ("table", "weights"):
        leaves = {n: inp[n].clone().requires_grad_(n == which) for n in ("table", "weights")}
        ref = {n: inp[n].double().requires_grad_(n == which) for n in ("table", "weights")}
        gather_weighted_triton(leaves["table"], inp["sel"], leaves["weights"]).backward(inp["do"])
        gather_weighted_ref(ref["table"], inp["sel"], ref["weights"]).backward(inp["do"].double())
        other = "weights" if which == "table" else "table"
        out[which] = {
            "err": (leaves[which].grad.double() - ref[which].grad).abs().max().item(),
            "other_is_none": leaves[other].grad is None,
        }
    return out


def _custom_op_path_difference() -> float:
    """Max difference between the custom ops (what torch.compile and FLOP counters see) and the
    eager fast path: the same kernels (deterministic "sorted" d_table), so it must be 0."""
    from affmae.ops.point_gather import function  # noqa: F401  (registers the ops)
    from affmae.ops.point_gather import kernel

    inp = make_inputs(B=1, Nq=7, Nk=5, H=2, Pt=2, K=3, F=16, seed=2)
    args = (inp["table"], inp["sel"], inp["weights"])
    direct = [kernel.gather_forward(*args), *kernel.gather_backward(inp["do"], *args, True, True, "sorted")]
    op = [torch.ops.affmae.point_gather_fwd(*args),
          *torch.ops.affmae.point_gather_bwd(inp["do"], *args, True, True, "sorted")]
    return max((a - b).abs().max().item() for a, b in zip(direct, op))


def _worker(path: str) -> None:
    """Run every interpreter case (TRITON_INTERPRET=1 is set by the caller) and write JSON."""
    from affmae.ops.point_gather.function import gather_weighted_triton

    def case(kw, dtype, dtable):
        fn = lambda *a: gather_weighted_triton(*a, dtable=dtable)  # noqa: E731
        return lambda: three_way(make_inputs(**kw), DTYPES[dtype], fn)

    jobs = {name: case(*spec) for name, spec in CASES.items()}
    write_results(path, {**jobs, "single_grad": _single_gradient_errors,
                         "custom_op": _custom_op_path_difference})


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_interpreter(__file__, tmp_path_factory.mktemp("interp"), timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_matches_reference(interpreter_results, case):
    rows = result(interpreter_results, case)
    assert set(rows) == set(NAMES), f"{case}: missing outputs {set(NAMES) - set(rows)}"
    assert_three_way(rows, case)


def test_interpreter_single_gradient(interpreter_results):
    for which, r in result(interpreter_results, "single_grad").items():
        assert r["other_is_none"], f"only {which} needed a gradient, the other input got one"
        assert r["err"] < 1e-5, f"d_{which} alone differs from the float64 reference by {r['err']:.3e}"


def test_interpreter_custom_ops_match_eager_path(interpreter_results):
    diff = result(interpreter_results, "custom_op")
    assert diff == 0.0, f"custom ops differ from the eager launchers by {diff}"


# ------------------------------------------------------------------------------------------------
# In-process CPU tests (no kernel launch)
# ------------------------------------------------------------------------------------------------


def test_reference_matches_explicit_gather():
    inp = make_inputs(B=2, Nq=9, Nk=5, H=3, Pt=2, K=4, F=8, duplicates=True)
    table, sel, w = inp["table"].double(), inp["sel"], inp["weights"].double()
    B, Nq, H, Pt, K = sel.shape
    b = torch.arange(B).view(B, 1, 1, 1, 1)
    h = torch.arange(H).view(1, 1, H, 1, 1)
    rows = table[b, sel, h]  # (B, Nq, H, Pt, K, F)
    want = (w[..., None] * rows).sum(-2)
    got = gather_weighted_ref(table, sel, w)
    assert got.dtype == torch.float64, f"float64 table gave {got.dtype}"
    err = (got - want).abs().max().item()
    assert err < 1e-12, f"reference differs from the explicit gather by {err:.3e}"
    # one slot list shared by the Pt weight sets: the same as that list repeated per point
    shared = sel[:, :, :, :1]
    err = (gather_weighted_ref(table, shared, w)
           - gather_weighted_ref(table, shared.expand(sel.shape).contiguous(), w)).abs().max()
    assert err == 0, f"shared slots differ from the expanded slots by {err:.3e}"


def test_interpolate_delegates_with_same_result():
    from affmae.ops.interpolate import gather_weighted as decoder_gather

    inp = make_inputs(B=1, Nq=6, Nk=4, H=2, Pt=2, K=3, F=8)
    args = (inp["table"].bfloat16(), inp["sel"], inp["weights"])
    got, want = decoder_gather(*args), gather_weighted_ref(*args)
    assert got.dtype == torch.bfloat16, f"decoder gather returned {got.dtype} for a bf16 table"
    assert torch.equal(got, want), f"CPU decoder gather differs from the reference by {(got - want).abs().max()}"


def test_why_not_names_the_reason(monkeypatch):
    from affmae.ops.point_gather import kernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sel = torch.zeros(1, 2, 1, 1, 4, dtype=torch.long)
    assert kernel.why_not(torch.zeros(1, 3, 1, 32), sel) is None, "fp32, F=32, K=4 should be supported"
    assert "float64" in kernel.why_not(torch.zeros(1, 3, 1, 32, dtype=torch.float64), sel)
    assert "F=8" in kernel.why_not(torch.zeros(1, 3, 1, 8), sel)
    assert "F=256" in kernel.why_not(torch.zeros(1, 3, 1, 256), sel)
    assert "K <= 64" in kernel.why_not(torch.zeros(1, 3, 1, 32), torch.zeros(1, 2, 1, 1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="weights shape"):
        kernel.check_inputs(torch.zeros(1, 3, 1, 32), sel, torch.zeros(1, 2, 1, 1, 3))
    with pytest.raises(ValueError, match="H=1"):
        kernel.check_inputs(torch.zeros(1, 3, 1, 32), torch.zeros(1, 2, 2, 1, 4, dtype=torch.long),
                            torch.zeros(1, 2, 2, 1, 4))


def test_backend_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("AFFMAE_POINT_GATHER_BACKEND", raising=False)
    inp = make_inputs(B=1, Nq=4, Nk=3, H=1, Pt=1, K=2, F=16)
    args = (inp["table"], inp["sel"], inp["weights"])
    reason = why_not_triton(inp["table"], inp["sel"])
    assert reason is not None and "cpu" in reason, f"CPU without interpreter should be refused: {reason}"
    with pytest.raises(RuntimeError, match="not CUDA"):
        gather_weighted(*args, backend="triton")
    with pytest.raises(ValueError, match="'cuda'"):
        gather_weighted(*args, backend="cuda")
    torch.testing.assert_close(gather_weighted(*args, backend="auto"), gather_weighted_ref(*args))
    monkeypatch.setenv("AFFMAE_POINT_GATHER_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        gather_weighted(*args)
    from affmae.ops.point_gather import dtable_mode

    monkeypatch.setenv("AFFMAE_POINT_GATHER_DTABLE", "scatter")
    with pytest.raises(ValueError, match="scatter"):
        dtable_mode()


def test_fake_shapes_and_flop_formula():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    import affmae.ops.point_gather.function  # noqa: F401  (registers the ops)

    B, Nk, H, F, Nq, Pt, K = 2, 11, 3, 24, 5, 4, 3
    with FakeTensorMode():
        table = torch.empty(B, Nk, H, F, dtype=torch.bfloat16)
        sel = torch.empty(B, Nq, H, Pt, K, dtype=torch.int64)
        w = torch.empty(B, Nq, H, Pt, K)
        with FlopCounterMode(display=False) as fc:
            out = torch.ops.affmae.point_gather_fwd(table, sel, w)
            d_table, d_w = torch.ops.affmae.point_gather_bwd(out, table, sel, w, True, True, "sorted")
    assert out.shape == (B, Nq, H, Pt, F) and out.dtype == torch.bfloat16, f"out {out.shape} {out.dtype}"
    assert d_table.shape == table.shape and d_table.dtype == torch.bfloat16, f"d_table {d_table.shape}"
    assert d_w.shape == w.shape and d_w.dtype == torch.float32, f"d_weights {d_w.shape} {d_w.dtype}"
    rows = B * Nq * H * Pt
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    want = {"affmae.point_gather_fwd": 2 * rows * K * F, "affmae.point_gather_bwd": 4 * rows * K * F}
    assert counts == want, f"FLOP counts {counts}, expected {want}"


# ------------------------------------------------------------------------------------------------
# GPU tests (full size)
# ------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# aff_small decoder at 512 px, batch 16: 2048 queries, up to 2048 source tokens, 6 heads of 64,
# 4 points per head, 4 neighbours per point.
FULL = dict(B=16, Nq=2048, Nk=2048, H=6, Pt=4, K=4, F=64)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("nk", [2048, 130])
@pytest.mark.parametrize("dtable", ["sorted", "atomic", "window"])
def test_gpu_full_size_matches_reference(dtype, nk, dtable):
    from affmae.ops.point_gather.function import gather_weighted_triton

    inp = make_inputs(**dict(FULL, Nk=nk), device="cuda", duplicates=nk == 130)
    fn = lambda *a: gather_weighted_triton(*a, dtable=dtable)  # noqa: E731
    assert_three_way(three_way(inp, DTYPES[dtype], fn), f"Nk={nk} {dtype} {dtable}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", ["decoder_folded", "merge_stage1", "merge_stage3",
                                   "merge_stage1_runs"])
def test_gpu_model_shapes_match_reference(dtype, shape):
    """The shapes the model runs since the point mixing and token merging became gathers:
    the decoder's Pt * K = 16 slots in one row, merging's Kc * m = 64 slots of 96/128 channels."""
    from affmae.ops.point_gather.function import gather_weighted_triton

    kw = {"decoder_folded": dict(B=16, Nq=2048, Nk=819, H=6, Pt=1, K=16, F=64),
          "merge_stage1": dict(B=16, Nq=819, Nk=2048, H=1, Pt=4, K=64, F=96, shared=True),
          "merge_stage3": dict(B=16, Nq=131, Nk=328, H=3, Pt=4, K=64, F=128, shared=True),
          # kept tokens of one cluster share its slot list (runs), as in the model
          "merge_stage1_runs": dict(B=16, Nq=819, Nk=2048, H=1, Pt=4, K=64, F=96, shared=True,
                                    runs=3)}[shape]
    inp = make_inputs(**kw, device="cuda")
    assert_three_way(three_way(inp, DTYPES[dtype], gather_weighted_triton), f"{shape} {dtype}")


@pytest.mark.gpu
@gpu
def test_gpu_sorted_dtable_is_deterministic():
    from affmae.ops.point_gather import kernel

    inp = make_inputs(**dict(FULL, Nk=130), device="cuda")
    args = (inp["do"].bfloat16(), inp["table"].bfloat16(), inp["sel"], inp["weights"])
    first = kernel.gather_backward(*args, dtable="sorted")[0]
    second = kernel.gather_backward(*args, dtable="sorted")[0]
    assert torch.equal(first, second), f"sorted d_table differs between runs by {(first - second).abs().max()}"


@pytest.mark.gpu
@gpu
def test_gpu_torch_compile_fullgraph():
    inp = make_inputs(B=2, Nq=300, Nk=200, H=6, Pt=4, K=4, F=64, device="cuda")
    do = inp["do"]

    def loss(table, sel, w):
        return (gather_weighted(table, sel, w, backend="triton").float() * do).sum()

    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        table = inp["table"].bfloat16().requires_grad_()
        w = inp["weights"].clone().requires_grad_()
        value = fn(table, inp["sel"], w)
        value.backward()
        results.append([value.detach(), table.grad.float(), w.grad])
    for name, e, c in zip(("loss",) + NAMES[1:], *results):
        torch.testing.assert_close(c, e, rtol=1e-2, atol=1e-2, msg=lambda s, n=name: f"compiled {n}: {s}")


@pytest.mark.gpu
@gpu
def test_gpu_auto_backend_choice(monkeypatch):
    monkeypatch.delenv("AFFMAE_POINT_GATHER_BACKEND", raising=False)
    table = torch.zeros(1, 3, 2, 64, device="cuda", dtype=torch.bfloat16)
    sel = torch.zeros(1, 4, 2, 4, 4, device="cuda", dtype=torch.long)
    assert resolve_backend("auto", table, sel) == "triton", f"auto chose torch: {why_not_triton(table, sel)}"
    with pytest.warns(UserWarning, match="float64"):
        assert resolve_backend("auto", table.double(), sel) == "torch"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert resolve_backend("auto", table, sel) == "triton", "sorted d_table is deterministic"
    monkeypatch.setenv("AFFMAE_POINT_GATHER_DTABLE", "atomic")
    assert resolve_backend("auto", table, sel) == "torch", "deterministic mode with atomics must use the reference"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
